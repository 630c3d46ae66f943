"""Behavioural evaluation: refusal judging (keywords, labels), chrF, scoring existing responses, and `eval`.

judge.py       refusal judges (the JUDGES registry, `get_judge`) and response labels (refusal/echo/degenerate/comply)
chrf.py        corpus chrF with sacrebleu's signature
score.py       scoring existing CSV/JSONL responses (`refusal-probe score`)
settings.py    EvalSettings: every `eval` setting, its --help text and default, validated when built
prompts.py     the prompt sets eval measures on (AdvBench, held-out translation rows, XSTest safe prompts)
checkpoint.py  evaluate one checkpoint: generate, judge, score, write its responses and summary.json
results.py     result folders, summary.json, behaviour.csv (merged across evals), eval.json
pipeline.py    the tree: discovery, output checks and lock, units of work, --shard, assembly
"""
