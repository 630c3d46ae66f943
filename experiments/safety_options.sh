#!/usr/bin/env bash
# Issue 9's comparison on the embedded Qwen (2 CPU cores): plain full fine-tuning against each safety-preserving
# option at equal steps (settings: experiments/safety-options.toml), then eval with 128 AdvBench prompts and analyze.
# Every command skips finished work, so re-running after an interruption resumes. Names as arguments train and
# evaluate only those runs (e.g. `bash experiments/safety_options.sh ema token-weighting`). Results table:
#   python experiments/table.py runs/safety-options/analysis/checkpoints.csv
set -euo pipefail
cd "$(dirname "$0")/.."
RP=${RP:-.venv/bin/refusal-probe}
CFG=experiments/safety-options.toml
OUT=${OUT:-runs/safety-options}
DIR=results/directions/qwen2.5-coder-0.5b-instruct   # the base refusal direction (layer 16, position -1)
EVAL=(--n-advbench 128 --n-translation 20 --max-new-tokens 48 --batch-size 16 --out "$OUT/eval")

declare -A OPTION=(
  [plain]="--checkpoint-fractions 0.5,1.0"
  [project-off-refusal]="--project-off-refusal"
  [gradient-surgery]="--gradient-surgery --surgery-every 1"
  [ewc]="--ewc 1e7"
  [refusal-preservation]="--refusal-preservation 1.0"
  [safety-monitor]="--safety-monitor --monitor-every 1"
  [freeze-auto]="--freeze-layers auto"
  [ema]="--ema-decay 0.9"
  [token-weighting]="--token-weighting"
)
ORDER=(plain project-off-refusal gradient-surgery ewc refusal-preservation safety-monitor freeze-auto ema token-weighting)
if (($#)); then
  for run in "$@"; do [[ -v OPTION[$run] ]] || { echo "safety_options.sh: unknown run '$run' (one of: ${ORDER[*]})" >&2; exit 2; }; done
  ORDER=("$@")
fi

for run in "${ORDER[@]}"; do
  echo "== $run: train $(date -u +%H:%M:%S)"
  # shellcheck disable=SC2086
  $RP train --config "$CFG" --out "$OUT" --run-name "$run" --refusal-direction "$DIR" ${OPTION[$run]}
  echo "== $run: eval $(date -u +%H:%M:%S)"
  $RP eval "$OUT/$run" "${EVAL[@]}"
done
echo "== eval (assemble) $(date -u +%H:%M:%S)"
$RP eval "$OUT" "${EVAL[@]}"
echo "== analyze $(date -u +%H:%M:%S)"
$RP analyze "$OUT" --layer 16 --position -1 --n-prompts 32 --behaviour "$OUT/eval/behaviour.csv" --out "$OUT/analysis"
echo "== done $(date -u +%H:%M:%S)"
