"""A plain-words reading of each checkpoint's causal drift at the refusal layer, against its own run's base.

Heuristic labels, not tests: no interval is attached to the causal scores, so a label near a threshold can flip with
other prompts. Each compares the checkpoint with the base row (step 0) of the same run:

- ``rotated``: the direction moved (cos_to_base < COS_KEPT) but the checkpoint's own direction is still necessary
  (necessity_own >= KEPT x the base's necessity): refusal is carried along a new direction;
- ``shrank``: the direction points the same way (cos >= COS_KEPT) but the harmful-harmless gap along it fell below
  KEPT x the base's gap: less of it is written;
- ``stopped reading``: direction and gap kept, but ablating (necessity_base) or adding (sufficiency_base) the base
  direction does less than KEPT x at the base: the signal is still written, later layers act on it less;
- ``kept``: direction, gap, necessity and sufficiency all at least KEPT x the base's;
- ``mixed``: the direction moved and the own direction is not necessary either;
- ``""`` (no reading): the base itself (``base``), a missing number, or a base whose direction is not causal
  (necessity_base < MIN_NECESSITY log-odds, or gap / sufficiency not positive at the base): nothing to lose.
"""

from __future__ import annotations

import math

import pandas as pd

COS_KEPT = 0.9
KEPT = 0.75
MIN_NECESSITY = 1.0
COLUMN = "causal_reading"
NEEDS = (
    "cos_to_base_at_rl",
    "proj_gap_at_rl",
    "necessity_base_at_rl",
    "necessity_own_at_rl",
    "sufficiency_base_at_rl",
)
HOW = (
    "per checkpoint against its run's base at the refusal layer (heuristic, no interval): rotated = "
    f"cos_to_base < {COS_KEPT} and necessity_own >= {KEPT} x base necessity; shrank = cos >= {COS_KEPT} and "
    f"proj_gap < {KEPT} x base gap; stopped reading = cos and gap kept but necessity_base or sufficiency_base "
    f"< {KEPT} x the base's; kept = all four kept; mixed = moved and own direction not necessary; empty where a "
    f"number is missing or the base's direction is not causal (necessity_base < {MIN_NECESSITY}, gap or sufficiency "
    "<= 0 at the base)"
)


def reading(
    cos: float,
    gap_ratio: float,
    necessity_base_ratio: float,
    necessity_own_ratio: float,
    sufficiency_ratio: float,
) -> str:
    """The label from the checkpoint's cosine and its four ratios to the base (see the module docstring)."""
    values = (cos, gap_ratio, necessity_base_ratio, necessity_own_ratio, sufficiency_ratio)
    if any(v is None or not math.isfinite(float(v)) for v in values):
        return ""
    if cos < COS_KEPT:
        return "rotated" if necessity_own_ratio >= KEPT else "mixed"
    if gap_ratio < KEPT:
        return "shrank"
    if necessity_base_ratio < KEPT or sufficiency_ratio < KEPT:
        return "stopped reading"
    return "kept"


def with_readings(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (checkpoints.csv) with a ``causal_reading`` column; unchanged when the causal columns are absent."""
    if any(c not in table.columns for c in NEEDS):
        return table
    labels = []
    for _, row in table.iterrows():
        base = table[(table["run"] == row["run"]) & (table["step"] == 0)]
        if row["step"] == 0 or not len(base):
            labels.append("")
            continue
        b = base.iloc[0]
        causal_at_base = (
            b["necessity_base_at_rl"] >= MIN_NECESSITY
            and b["proj_gap_at_rl"] > 0
            and b["sufficiency_base_at_rl"] > 0
        )
        if not causal_at_base:
            labels.append("")
            continue
        labels.append(
            reading(
                row["cos_to_base_at_rl"],
                row["proj_gap_at_rl"] / b["proj_gap_at_rl"],
                row["necessity_base_at_rl"] / b["necessity_base_at_rl"],
                row["necessity_own_at_rl"] / b["necessity_base_at_rl"],
                row["sufficiency_base_at_rl"] / b["sufficiency_base_at_rl"],
            )
        )
    return table.assign(**{COLUMN: labels})
