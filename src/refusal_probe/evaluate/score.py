"""Score responses that already exist (ours or anyone's) from a CSV or JSONL table: refusal rate and label rates,
or corpus chrF, per group. Used by `refusal-probe score`."""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.evaluate.chrf import corpus_chrf
from refusal_probe.evaluate.judge import KeywordJudge, label_rates

ALL = "all"


def read_table(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (dicts) and column names of a .csv or .jsonl file. Short CSV rows get "" for their missing cells."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; pass an existing .csv or .jsonl file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh, restval="")
                rows = [{k: v for k, v in row.items() if k is not None} for row in reader]
                columns = list(reader.fieldnames or [])
        elif suffix in (".jsonl", ".ndjson"):
            rows, columns = [], []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise UserError(f"{path}: line {i} is not a JSON object; every line must be one object")
                rows.append(obj)
                columns.extend(k for k in obj if k not in columns)
        else:
            raise UserError(f"{path}: unsupported file type '{suffix}'; use .csv or .jsonl")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot parse ({exc}); fix the file") from None
    if not rows:
        raise UserError(f"{path}: holds no rows; nothing to score")
    return rows, columns


def require_columns(path: str | Path, columns: Sequence[str], wanted: dict[str, str | None]) -> None:
    """UserError naming the option and the missing column, listing the columns that exist."""
    for option, col in wanted.items():
        if col is not None and col not in columns:
            raise UserError(
                f"{path}: no column '{col}' (given by {option}); columns are: {', '.join(columns) or '(none)'}"
            )


def _cell(row: dict[str, Any], col: str) -> str:
    v = row.get(col)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return v if isinstance(v, str) else str(v)


def group_rows(rows: list[dict[str, Any]], group_by: str | None) -> dict[str, list[dict[str, Any]]]:
    """Rows by the value of ``group_by`` (first-seen order), or everything under "all"."""
    if group_by is None:
        return {ALL: rows}
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_cell(row, group_by), []).append(row)
    return groups


def score_refusal(
    rows: list[dict[str, Any]], judge: KeywordJudge, text_col: str, prompt_col: str | None = None
) -> dict[str, Any]:
    """{"n", "value" (refusal rate), "label_<x>" rates, "signature"} for one group of rows."""
    texts = [_cell(r, text_col) for r in rows]
    prompts = [_cell(r, prompt_col) if prompt_col else None for r in rows]
    verdicts = [judge.is_refusal(t) for t in texts]
    labels = [judge.label(t, p) for t, p in zip(texts, prompts, strict=True)]
    out: dict[str, Any] = {"n": len(rows), "value": sum(verdicts) / len(rows) if rows else float("nan")}
    out.update(label_rates(labels))
    out["signature"] = judge.signature
    return out


def score_chrf(rows: list[dict[str, Any]], hyp_col: str, ref_col: str) -> dict[str, Any]:
    res = corpus_chrf([_cell(r, hyp_col) for r in rows], [_cell(r, ref_col) for r in rows])
    return {"n": res.n, "value": res.score, "signature": res.signature}


def format_table(results: dict[str, dict[str, Any]], value_name: str, digits: int) -> str:
    """A readable fixed-width table (one line per group) with the signature underneath."""
    keys = [k for k in next(iter(results.values())) if k not in ("n", "value", "signature")]
    header = ["group", "n", value_name, *keys]
    lines = [header]
    for group, res in results.items():
        shown = group if group != "" else "(empty)"
        lines.append(
            [shown, str(res["n"]), f"{res['value']:.{digits}f}", *(f"{res[k]:.{digits}f}" for k in keys)]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )
    signatures = dict.fromkeys(res["signature"] for res in results.values())
    return text + "\n" + "\n".join(f"signature: {s}" for s in signatures)
