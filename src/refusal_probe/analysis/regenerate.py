"""`refusal-probe report TREE_OR_ANALYSIS_DIR`: the report again from an analysis folder's tables and summary.json.

No model is loaded and nothing is measured: Figures 1 and 2 are redrawn from checkpoints.csv, the other figures are
the PNG/SVG files analyze drew (copied beside the report when --out is another folder), and the findings are
recomputed from the tables. A tree resolves to its default analysis folder, as `analyze` would write it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from refusal_probe.analysis.readings import COLUMN as READING
from refusal_probe.analysis.tables import read_table
from refusal_probe.core.errors import UserError

SUMMARY_FORMAT = "refusal-probe/analysis/"
HINT = "pass the folder `refusal-probe analyze` wrote (it holds summary.json), or run `refusal-probe analyze TREE`"


def analysis_folder(target: str | Path) -> Path:
    """The analysis folder that ``target`` names: itself when it holds summary.json, else the tree's default one."""
    from refusal_probe.models.tree import default_output

    path = Path(target).expanduser()
    if not path.exists():
        raise UserError(f"{target}: no such folder; {HINT}")
    if not path.is_dir():
        raise UserError(f"{target}: not a folder; {HINT}")
    if (path / "summary.json").is_file():
        return path
    default = default_output(path, "analysis")
    if (default / "summary.json").is_file():
        return default
    raise UserError(f"{target}: no summary.json here nor in its analysis folder {default}; {HINT}")


def read_summary(folder: Path) -> dict[str, Any]:
    path = folder / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"{path}: cannot read it as JSON ({reason}); re-run `refusal-probe analyze`"
        ) from None
    if not isinstance(summary, dict) or not str(summary.get("format", "")).startswith(SUMMARY_FORMAT):
        raise UserError(
            f"{path}: not the summary.json of `refusal-probe analyze` (no analysis format); {HINT}"
        )
    return summary


def _copy(src: Path, dst: Path) -> Path:
    from refusal_probe.core.io import atomic_write

    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def regenerate(target: str | Path, out: str | Path | None = None) -> Path:
    """Write report.md, report.html and Figures 1 and 2 into ``out`` (default: the analysis folder itself)."""
    from refusal_probe.analysis import correlate, report
    from refusal_probe.core.io import output_lock, prepare_output

    folder = analysis_folder(target)
    summary = read_summary(folder)
    table = read_table(folder, "checkpoints", required=True)
    missing = [c for c in ("run", "step") if c not in table.columns]
    if missing:
        raise UserError(
            f"{folder / 'checkpoints.csv'}: lacks columns {', '.join(missing)}; re-run `refusal-probe analyze`"
        )
    if READING in table.columns:  # an empty reading is read back as NaN: empty again, as in analyze's report
        reading = table[READING].astype(object)
        table[READING] = reading.where(reading.notna(), "")
    corr = read_table(folder, "correlations")
    drift = read_table(folder, "drift")
    beh = read_table(folder, "behaviour")
    dest = Path(out).expanduser() if out else folder
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--out {dest}: is a file; pass --out DIR with a folder")
    prepare_output(dest)
    per_layer = None
    layer_table = read_table(folder, "per_layer_correlations")
    if layer_table is not None and len(layer_table):  # its pooled cos_to_base rows, as analyze reports them
        per_layer = correlate.pooled_layers(layer_table)
    elif drift is not None and beh is not None and "cos_to_base" in set(drift["metric"]):
        per_layer = correlate.per_layer_correlation(drift, beh)
    with output_lock(dest, "analyze or report"):
        figures: list[Path] = []
        for name in summary.get("figures") or []:
            src = folder / str(name)
            if "/" in str(name) or not src.is_file() or src.stem in report.STUDY_FIGURES:
                continue
            figures.append(src if dest.resolve() == folder.resolve() else _copy(src, dest / src.name))
        return report.write_report(
            dest, summary, table, corr, figures, per_layer=per_layer, inputs_dir=folder
        )
