#!/usr/bin/env bash
# Issue 8's mini-study: the cpu-small sweep (experiments/cpu-small.toml: full, LoRA, QLoRA, DPO at lr 1e-4 and 1e-5,
# 8 steps, checkpoints at 25/50/75/100%) evaluated on 128 AdvBench prompts per checkpoint, analysed, and tested
# against the study's three claims (analysis/compare_with_study.py). Every command skips finished work, so an
# interrupted run resumes. Measured cost on 2 idle CPU cores: training ~1 h 45 min (the committed sweep), about
# 2.5 min of evaluation and 1.1 min of analysis per checkpoint (33 with the bases): about 3 h 45 min in all.
set -euo pipefail
cd "$(dirname "$0")/.."
RP=${RP:-.venv/bin/refusal-probe}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/cpu-small}
N=${N:-128}
$RP sweep experiments/cpu-small.toml
$RP eval "$OUT" --n-advbench "$N" --n-translation 20 --max-new-tokens 48 --batch-size 16 --out "$OUT/eval-n$N"
$RP analyze "$OUT" --layer 16 --position -1 --n-prompts 32 --behaviour "$OUT/eval-n$N/behaviour.csv" \
    --out "$OUT/analysis-n$N"
$PY analysis/compare_with_study.py "$OUT/analysis-n$N" --n "$N" --out "analysis/results/cpu-small-n$N"
