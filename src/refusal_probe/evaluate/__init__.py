"""Behavioural evaluation: batched greedy generation, refusal judging (keywords, labels) and chrF.

judge.py     refusal judges (`get_judge`) and response labels (refusal / echo / degenerate / comply)
chrf.py      corpus chrF with sacrebleu's signature
generate.py  batched greedy generation with early exit and out-of-memory back-off
score.py     scoring existing CSV/JSONL responses (`refusal-probe score`)
evaluate.py  the checkpoint-tree evaluation behind `refusal-probe eval`
"""
