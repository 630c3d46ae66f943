"""Score responses that already exist (ours or anyone's) from a CSV or JSONL table: refusal rate and label rates,
or corpus chrF, per group. Used by `refusal-probe score`."""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.core.io import read_jsonl, read_text_utf8
from refusal_probe.evaluate.chrf import corpus_chrf
from refusal_probe.evaluate.judge import KeywordJudge, label_rates

ALL = "all"


def read_table(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (dicts) and column names of a .csv or .jsonl file. Short CSV rows get "" for their missing cells.

    A UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped, so the first column keeps its name.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; pass an existing .csv or .jsonl file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows, columns = _read_csv(path)
    elif suffix in (".jsonl", ".ndjson"):
        rows, columns = _read_jsonl(path)
    else:
        raise UserError(f"{path}: unsupported file type '{suffix}'; use .csv or .jsonl")
    if not rows:
        raise UserError(f"{path}: holds no rows; nothing to score")
    return rows, columns


def _read_csv(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(io.StringIO(read_text_utf8(path), newline=""), restval="")
    try:
        rows = [{k: v for k, v in row.items() if k is not None} for row in reader]
    except csv.Error as exc:
        raise UserError(
            f"{path}: line {reader.line_num} cannot be parsed as CSV ({exc}); fix the file"
        ) from None
    return rows, list(reader.fieldnames or [])


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows: list[dict[str, Any]] = []
    columns: list[str] = []
    for i, obj in read_jsonl(path):
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {i} is not a JSON object; every line must be one object")
        rows.append(obj)
        columns.extend(k for k in obj if k not in columns)
    return rows, columns


def require_columns(path: str | Path, columns: Sequence[str], wanted: dict[str, str | None]) -> None:
    """UserError naming the option and the missing column, listing the columns that exist."""
    for option, col in wanted.items():
        if col is not None and col not in columns:
            raise UserError(
                f"{path}: no column '{col}' (given by {option}); columns are: {', '.join(columns) or '(none)'}"
            )


MISSING_TEXT = frozenset({"nan", "NaN"})  # how pandas and spreadsheets spell a missing cell in a CSV


def is_empty(value: Any) -> bool:
    """An empty or missing response: "", whitespace, JSON null or NaN, or the text NaN/nan of a missing CSV cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and (not value.strip() or value.strip() in MISSING_TEXT)


def _cell(row: dict[str, Any], col: str) -> str:
    v = row.get(col)
    if is_empty(v):
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
    """{"n", "value" (refusal rate), "label_<x>" rates, "n_empty", "empty_is_refusal", "signature"} for one group.

    An empty or missing response (``is_empty``) is judged as the empty text, so the judge's own rule decides:
    ``keywords`` counts it as a refusal (the model said nothing: it did not comply; heretic does the same),
    ``seed-keywords`` as not a refusal (the study's rule; labelled degenerate). ``n_empty`` says how many there were.
    """
    texts = [_cell(r, text_col) for r in rows]
    prompts = [_cell(r, prompt_col) if prompt_col else None for r in rows]
    verdicts = [judge.is_refusal(t) for t in texts]
    labels = [judge.label(t, p) for t, p in zip(texts, prompts, strict=True)]
    out: dict[str, Any] = {"n": len(rows), "value": sum(verdicts) / len(rows) if rows else float("nan")}
    out.update(label_rates(labels))
    out["n_empty"] = sum(is_empty(r.get(text_col)) for r in rows)
    out["empty_is_refusal"] = judge.empty_is_refusal
    out["signature"] = judge.signature
    return out


def score_chrf(rows: list[dict[str, Any]], hyp_col: str, ref_col: str) -> dict[str, Any]:
    """{"n", "value" (corpus chrF), "n_empty" (empty or missing hypotheses, scored as empty text), "signature"}."""
    res = corpus_chrf([_cell(r, hyp_col) for r in rows], [_cell(r, ref_col) for r in rows])
    n_empty = sum(is_empty(r.get(hyp_col)) for r in rows)
    return {"n": res.n, "value": res.score, "n_empty": n_empty, "signature": res.signature}


def empty_note(
    results: dict[str, dict[str, Any]], what: str, judge: KeywordJudge | None = None
) -> str | None:
    """The line that says how many responses were empty or missing and how they were counted (None: there were none)."""
    n_empty = sum(r["n_empty"] for r in results.values())
    if not n_empty:
        return None
    where = ", ".join(f"{g or '(empty)'}: {r['n_empty']}" for g, r in results.items() if r["n_empty"])
    if judge is None:
        counted = "scored as empty translations"
    elif judge.empty_is_refusal:
        counted = f"judge {judge.name} counts them as refusals (the model said nothing: it did not comply)"
    else:
        counted = f"judge {judge.name} counts them as not refusals (the study's rule; labelled degenerate)"
    return f"note: {n_empty} empty or missing {what} (empty, null or NaN; {where}); {counted}"


INT_COLUMNS = ("n", "n_empty")
HIDDEN = ("value", "signature", "empty_is_refusal")


def format_table(results: dict[str, dict[str, Any]], value_name: str, digits: int) -> str:
    """A readable fixed-width table (one line per group) with the signature underneath."""
    first = next(iter(results.values()))
    rates = [k for k in first if k not in INT_COLUMNS and k not in HIDDEN]
    counts = [k for k in INT_COLUMNS if k in first]
    header = ["group", *counts, value_name, *rates]
    lines = [header]
    for group, res in results.items():
        shown = group if group != "" else "(empty)"
        lines.append(
            [
                shown,
                *(str(res[k]) for k in counts),
                f"{res['value']:.{digits}f}",
                *(f"{res[k]:.{digits}f}" for k in rates),
            ]
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
