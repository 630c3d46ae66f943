"""Where `eval` keeps its results and how they are read back: per-checkpoint folders, summary.json (the mark of a
finished evaluation), the tidy behaviour.csv, and the top-level eval.json.

Layout (results live outside the checkpoint folders, which are never written to)::

    <out>/<run>/<checkpoint>/{advbench.jsonl, translation.jsonl, xstest.jsonl, summary.json}
    <out>/_base/<safe base name>/...          the base, once per distinct base (and quantization)
    <out>/behaviour.csv                       run, checkpoint, method, lr, step, fraction, metric, value, signature
    <out>/eval.json                           what the last plain run found in the tree (skipped folders, notes)

Every folder name built from a name read from the user's files (run.json's run, folder names, specs) goes through
``core.io.safe_filename``, so nothing is written outside ``<out>``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.core.hashing import cache_key
from refusal_probe.core.io import atomic_write, read_json, safe_filename
from refusal_probe.evaluate.judge import LABELS
from refusal_probe.evaluate.settings import EvalSettings
from refusal_probe.models.source import looks_local

SUMMARY_FORMAT = "refusal-probe/eval/1"
EVAL_JSON_FORMAT = "refusal-probe/eval-tree/1"
BEHAVIOUR_COLUMNS = ("run", "checkpoint", "method", "lr", "step", "fraction", "metric", "value", "signature")
REFUSAL_METRICS = ("refusal_rate", *(f"label_{lab}" for lab in LABELS))
BASE_DIR = "_base"


def safe_name(spec: str) -> str:
    """A folder name for a model spec: a local path's last component plus a short hash of its resolved path (the
    same folder for ``tiny``, ``./tiny`` and ``../x/tiny``), or the spec itself with '/' as '--' (hub ids,
    embedded names)."""
    text = str(spec)
    if looks_local(text) or Path(text).expanduser().exists():  # one folder however the path was spelled
        digest = hashlib.sha256(str(Path(text).expanduser().resolve()).encode()).hexdigest()[:8]
        text = f"{Path(text).name}-{digest}"
    return safe_filename(text.replace("/", "--"))


def settings_hash(settings: EvalSettings, judge_signature: str, fingerprint: str) -> str:
    """The key of a finished evaluation: a summary with this hash is current and skipped on a re-run."""
    payload = {
        "format": SUMMARY_FORMAT,
        "settings": settings.hashed(),
        "judge": judge_signature,
        "model": fingerprint,
    }
    return cache_key(payload)


def eval_dir_for(out: Path, ckpt) -> Path:
    """The checkpoint's result folder: always one level of safe names below ``out`` (or ``out/_base``)."""
    if ckpt.kind == "base":
        quant = f"-{ckpt.quant.tag}" if ckpt.quant else ""
        return out / BASE_DIR / safe_filename(safe_name(ckpt.base or str(ckpt.path)) + quant)
    return out / safe_filename(str(ckpt.run)) / safe_filename(str(ckpt.name))


def existing_summary(eval_dir: Path) -> dict[str, Any] | None:
    """A finished evaluation's summary.json, or None (missing, damaged or of another format: evaluate again)."""
    path = eval_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = read_json(path)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("format") == SUMMARY_FORMAT else None


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ behaviour.csv


def behaviour_rows(pairs: Iterable[tuple[Any, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Tidy rows for behaviour.csv from (checkpoint, summary) pairs: one per checkpoint and metric.

    ``checkpoint`` is the tree's name ("base", the folder name, or "final"), so rows without a step (a root adapter,
    a plain save_pretrained folder) still join; a base appears once per run (step 0).
    """
    rows = []
    for ck, s in pairs:
        for metric, value in s["metrics"].items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            rows.append(
                {
                    "run": ck.run,
                    "checkpoint": ck.name,
                    "method": ck.method or "",
                    "lr": "" if ck.lr is None else ck.lr,
                    "step": 0 if ck.kind == "base" else ("" if ck.step is None else ck.step),
                    "fraction": 0.0 if ck.kind == "base" else ("" if ck.fraction is None else ck.fraction),
                    "metric": metric,
                    "value": value,
                    "signature": s["signatures"].get(metric, ""),
                }
            )
    return rows


def read_behaviour_csv(path: Path) -> list[dict[str, str]]:
    """The rows of an existing behaviour.csv (empty when there is none)."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = set(reader.fieldnames or ())
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(
            f"{path}: existing behaviour table cannot be read ({exc}); move it away or pass another --out DIR"
        ) from None
    if rows and not {"run", "metric", "value"} <= columns:
        raise UserError(
            f"{path}: existing file is not a behaviour table of refusal-probe eval; move it away or pass "
            "another --out DIR"
        )
    return rows


def merge_behaviour(existing: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]], keys) -> list[dict]:
    """``new`` plus the rows of ``existing`` that belong to no checkpoint in ``keys`` ((run, checkpoint) pairs).

    An ``--out`` shared by several evals keeps every run's rows; the rows of the checkpoints evaluated now are
    replaced. A row from a table older than the checkpoint column belongs to its run as a whole.
    """
    keys = set(keys)
    runs = {run for run, _ in keys}
    kept = []
    for row in existing:
        name = row.get("checkpoint")
        if (row.get("run"), name) in keys or (name is None and row.get("run") in runs):
            continue
        kept.append({c: row.get(c, "") for c in BEHAVIOUR_COLUMNS})
    merged = kept + list(new)
    order = {run: i for i, run in enumerate(dict.fromkeys(r["run"] for r in merged))}
    return sorted(merged, key=lambda r: order[r["run"]])  # stable: each run's rows stay together, in order


def write_behaviour_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=BEHAVIOUR_COLUMNS)
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, write)


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = [f"{k} {v:.2f}" if k == "chrf" else f"{k} {v:.3f}" for k, v in metrics.items()]
    return ", ".join(parts) or "nothing measured"
