"""Analysis: join per-checkpoint measurements, correlate drift with behaviour, draw figures, write the report.

Modules: ``tables`` (tidy files and the one-row-per-checkpoint table), ``correlate`` (Pearson/Spearman over
checkpoints), ``uncertainty`` (run-resampling bootstrap intervals, partial correlation), ``plots`` (matplotlib figures, PNG + SVG) and ``report`` (report.md / report.html).
Nothing is imported here so that ``refusal-probe --help`` stays fast.
"""
