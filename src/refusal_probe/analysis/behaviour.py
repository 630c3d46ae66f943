"""The behaviour table `eval` writes, read and checked before any model loads, and joined to the tree's checkpoints
by (run, checkpoint name), never by (run, step): a root adapter or a plain save_pretrained folder has no step.

Files written before `eval` had a ``checkpoint`` column are joined by (run, step) and take the name from the tree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError

REQUIRED = ("run", "step", "metric", "value")


def default_behaviour(spec: str) -> Path:
    """Where `eval` writes behaviour.csv for the same tree by default."""
    from refusal_probe.models.tree import default_output

    return default_output(spec, "eval") / "behaviour.csv"


def load_behaviour(spec: str, behaviour: str | Path | None):
    """(table, path) of --behaviour FILE, else of eval's default output when it exists, else (empty, None)."""
    import pandas as pd

    path = Path(behaviour) if behaviour else default_behaviour(spec)
    if not path.exists():
        if behaviour:
            raise UserError(
                f"--behaviour {path}: behaviour table not found; run `refusal-probe eval` first or drop --behaviour"
            )
        return pd.DataFrame(), None
    flag = "--behaviour " if behaviour else ""
    if not path.is_file():
        raise UserError(f"{flag}{path}: not a file; pass the behaviour.csv that `refusal-probe eval` writes")
    if path.stat().st_size == 0:
        raise UserError(f"{flag}{path}: the behaviour table is empty; re-run `refusal-probe eval`")
    try:
        df = pd.read_csv(
            path,
            dtype={"run": str, "method": str, "checkpoint": str},
            keep_default_na=False,
            na_values=[""],
            encoding="utf-8-sig",
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"{flag}{path}: cannot read the behaviour table ({reason}); re-run `refusal-probe eval`"
        ) from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise UserError(
            f"{flag}{path}: behaviour table lacks columns {', '.join(missing)}; use the file `refusal-probe eval` "
            "writes"
        )
    if not len(df):
        raise UserError(f"{flag}{path}: the behaviour table has no rows; re-run `refusal-probe eval`")
    value = pd.to_numeric(df["value"], errors="coerce")
    bad = df["value"].notna() & value.isna()
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0]) + 2  # 1-based, after the header
        raise UserError(f"{flag}{path}: line {row}: value {df['value'][bad].iloc[0]!r} is not a number")
    df["value"] = value
    return df, path


def _step_key(step: Any) -> int | None:
    try:
        f = float(step)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else int(f)


def align_behaviour(beh, ckpts) -> tuple[Any, list[str]]:
    """Behaviour rows of this tree's checkpoints with a ``checkpoint`` column; method/lr/fraction filled from the tree
    where the table lacks them. Also returns notes on rows that matched no checkpoint."""
    import pandas as pd

    if beh is None or not len(beh):
        return pd.DataFrame(), []
    by_name = {(c.run, c.name): c for c in ckpts}
    if "checkpoint" in beh.columns and beh["checkpoint"].notna().all():
        keys = list(zip(beh["run"], beh["checkpoint"], strict=True))
        found = [by_name.get(k) for k in keys]
    else:  # an older behaviour.csv: join by (run, step); the base is step 0
        by_step: dict[tuple[str, int | None], Any] = {}
        for c in ckpts:
            by_step.setdefault((c.run, 0 if c.kind == "base" else c.step), c)
        found = [by_step.get((r, _step_key(s))) for r, s in zip(beh["run"], beh["step"], strict=True)]
    keep = [c is not None for c in found]
    notes = []
    if not all(keep):
        stray = sorted({f"{r}" for r, k in zip(beh["run"], keep, strict=True) if not k})
        notes.append(
            f"behaviour table: {keep.count(False)} row(s) of runs/checkpoints not in this tree ignored "
            f"({', '.join(stray[:5])}{'...' if len(stray) > 5 else ''})"
        )
    matched = [c for c in found if c is not None]
    out = beh[keep].copy()
    out["checkpoint"] = [c.name for c in matched]
    out["step"] = pd.to_numeric(pd.Series([0 if c.kind == "base" else c.step for c in matched], dtype=object))
    for col in ("method", "lr", "fraction"):
        vals = [getattr(c, col) for c in matched]
        out[col] = out[col].where(out[col].notna(), vals) if col in out else vals
    return out.reset_index(drop=True), notes


def signatures(beh) -> dict[str, str]:
    """metric -> how it was computed, from the behaviour table's signature column."""
    if not len(beh) or "signature" not in beh:
        return {}
    pairs = beh.dropna(subset=["signature"]).drop_duplicates(["metric", "signature"])
    return {
        f"{m}" if (pairs["metric"] == m).sum() == 1 else f"{m} ({i})": sig
        for i, (m, sig) in enumerate(zip(pairs["metric"], pairs["signature"], strict=True))
    }
