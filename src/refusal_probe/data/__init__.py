"""Bundled datasets (see files/PROVENANCE.md for sources and licences) and a loader for user prompt files."""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

from refusal_probe.core.errors import UserError
from refusal_probe.core.io import read_jsonl

PROMPT_COLUMNS = ("prompt", "instruction", "goal", "text", "question", "behavior", "Goal")


def bundled(relpath: str) -> Path:
    """Path of a file shipped under refusal_probe/data/files/."""
    return Path(str(resources.files("refusal_probe.data").joinpath("files", relpath)))


def load_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts from .txt (one per line), .csv, .json (list of str or objects) or .jsonl.

    For tables and objects the prompt is taken from ``column`` or the first of PROMPT_COLUMNS present. Text is read as
    UTF-8 with or without a byte-order mark (Excel writes one at the start of a CSV header).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: prompt file not found; pass an existing .txt/.csv/.json/.jsonl file")
    if not path.is_file():
        raise UserError(f"{path}: not a file; pass a .txt/.csv/.json/.jsonl prompt file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            prompts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
        elif suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
            prompts = _from_records(rows, column, path)
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(data, dict):
                data = next((v for v in data.values() if isinstance(v, list)), [])
            prompts = _from_records(data, column, path)
        elif suffix == ".jsonl":
            prompts = _from_records([row for _, row in read_jsonl(path)], column, path)
        else:
            raise UserError(
                f"{path}: unsupported prompt file type '{suffix}'; use .txt, .csv, .json or .jsonl"
            )
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot parse prompt file ({exc}); fix the file or pass another") from None
    except OSError as exc:
        raise UserError(
            f"{path}: cannot read prompt file ({exc.strerror or exc}); pass a readable file"
        ) from None
    prompts = [p for p in prompts if p and p.strip()]
    if not prompts:
        raise UserError(f"{path}: prompt file holds no prompts; add at least one non-empty prompt")
    return prompts


def _from_records(rows: list, column: str | None, path: Path) -> list[str]:
    if rows and all(isinstance(r, str) for r in rows):
        return [r.strip() for r in rows]
    if not rows:
        return []
    keys = rows[0].keys() if isinstance(rows[0], dict) else ()
    col = column or next((c for c in PROMPT_COLUMNS if c in keys), None)
    if col is None or col not in keys:
        found = ", ".join(map(str, keys)) or "none"
        raise UserError(
            f"{path}: no prompt column found (looked for {column or ', '.join(PROMPT_COLUMNS)}; the file has "
            f"{found}); name the column holding the prompts 'prompt'"
        )
    return [str(r.get(col, "")).strip() for r in rows]


def _json_instructions(relpath: str) -> list[str]:
    return [r["instruction"] for r in json.loads(bundled(relpath).read_text(encoding="utf-8"))]


def harmful_train() -> list[str]:
    """Refusal-direction harmful_train split minus its 117 AdvBench items (143 prompts): no leak into AdvBench."""
    return _json_instructions("refusal_direction/harmful_train_no_advbench.json")


def harmful_val() -> list[str]:
    """HarmBench validation prompts (39): held out for direction selection and validation."""
    return _json_instructions("refusal_direction/harmful_val.json")


def harmful_test() -> list[str]:
    """JailbreakBench + HarmBench test + StrongREJECT prompts (572): held out from extraction and selection."""
    return _json_instructions("refusal_direction/harmful_test.json")


def harmless_train() -> list[str]:
    """Alpaca instructions (first 2,048 of the refusal-direction harmless_train split; CC BY-NC 4.0)."""
    return _json_instructions("refusal_direction/harmless_train_first2048.json")


def harmless_val() -> list[str]:
    """Alpaca instructions (first 1,024 of harmless_val), disjoint from harmless_train."""
    return _json_instructions("refusal_direction/harmless_val_first1024.json")


def advbench() -> list[str]:
    """The 520 AdvBench harmful behaviours (goal column), in file order."""
    with bundled("advbench/harmful_behaviors.csv").open(newline="", encoding="utf-8") as fh:
        return [row["goal"] for row in csv.DictReader(fh)]


def seed_keywords() -> list[str]:
    """The study's 47 refusal keywords, verbatim and in order (duplicates kept)."""
    lines = bundled("seed/advbench_refusal_keywords.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("#")]
