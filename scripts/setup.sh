#!/usr/bin/env bash
# Create .venv and install refusal-probe with its test tools. Idempotent; CPU torch wheel first (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: a bare `torch` requirement makes pip fetch a multi-GB CUDA build on CPU machines.
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
