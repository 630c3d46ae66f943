"""The study's three claims, tested on an analysed sweep with their uncertainty.

Kempermann & Ramackers (2025) report that (1) full fine-tuning and DPO lose far more refusal than LoRA/QLoRA at the
same learning rate, (2) higher learning rates lose more, and (3) most of the loss happens in the first 25% of
training. Each claim becomes a set of comparisons between refusal rates judged on n prompts; each comparison gets a
95% interval and a verdict: "agrees" when the interval lies on the claim's side of 0 (or of one half, for the
share), "disagrees" when it lies on the other side, "inconclusive" when it straddles. Rates of two checkpoints on
the same prompts are paired data; Newcombe's interval for independent rates is used, which is conservative for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from refusal_probe.analysis.tables import final_checkpoints
from refusal_probe.analysis.uncertainty import newcombe_diff

FULL_PARAMETER = ("full", "dpo")
ADAPTER = ("lora", "qlora")
N_BOOT = 2000
SEED = 0


@dataclass(frozen=True)
class Comparison:
    claim: str  # method | lr | early
    what: str
    estimate: float
    low: float
    high: float
    verdict: str  # agrees | disagrees | inconclusive


def verdict(low: float, high: float, threshold: float = 0.0) -> str:
    """Which side of ``threshold`` a 95% interval lies on, the claim's side being above it."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    if low > threshold:
        return "agrees"
    if high < threshold:
        return "disagrees"
    return "inconclusive"


def rate_gap(a: float, b: float, n: int) -> tuple[float, float, float]:
    """a - b for two refusal rates judged on n prompts each, with Newcombe's 95% interval."""
    lo, hi = newcombe_diff(round(b * n), n, round(a * n), n)
    return a - b, lo, hi


def early_share(base: float, first: float, final: float, n: int, n_boot: int = N_BOOT, seed: int = SEED):
    """Share of the base-to-final loss of refusal already lost at the first checkpoint, (base - first) /
    (base - final), with a parametric-bootstrap 95% interval (each rate redrawn as Binomial(n, rate) / n; resamples
    with no loss left are dropped). NaN when the run lost nothing."""
    if not base - final > 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    b, f1, fN = (rng.binomial(n, p, size=n_boot) / n for p in (base, first, final))
    keep = (b - fN) > 0
    share = (b[keep] - f1[keep]) / (b[keep] - fN[keep])
    lo, hi = np.percentile(share, [2.5, 97.5]) if keep.any() else (math.nan, math.nan)
    return (base - first) / (base - final), float(lo), float(hi)


def _base_rate(table: pd.DataFrame, run: str) -> float:
    base = table[(table["run"] == run) & (pd.to_numeric(table["step"]) == 0)]
    return float(base["refusal_rate"].iloc[0]) if len(base) else math.nan


def compare(table: pd.DataFrame, n: int) -> list[Comparison]:
    """Every comparison of the three claims that the checkpoint table (``checkpoints.csv``) supports."""
    final = final_checkpoints(table)
    final = final[final["refusal_rate"].notna()]
    out: list[Comparison] = []
    # (1) method: full-parameter vs adapter at the same lr, final checkpoints (a higher rate for the adapter agrees)
    for lr, at in final.groupby("lr"):
        for _, big in at[at["method"].isin(FULL_PARAMETER)].iterrows():
            for _, small in at[at["method"].isin(ADAPTER)].iterrows():
                d, lo, hi = rate_gap(small["refusal_rate"], big["refusal_rate"], n)
                out.append(
                    Comparison(
                        "method",
                        f"lr {lr:g}: {small['method']} - {big['method']} final refusal",
                        d,
                        lo,
                        hi,
                        verdict(lo, hi),
                    )
                )
    # (2) lr: within a method, the lowest lr's final refusal minus the highest's (positive agrees)
    for method, runs in final.groupby("method"):
        if runs["lr"].nunique() < 2:
            continue
        low_lr, high_lr = runs.loc[runs["lr"].idxmin()], runs.loc[runs["lr"].idxmax()]
        d, lo, hi = rate_gap(low_lr["refusal_rate"], high_lr["refusal_rate"], n)
        out.append(
            Comparison(
                "lr",
                f"{method}: lr {low_lr['lr']:g} - lr {high_lr['lr']:g} final refusal",
                d,
                lo,
                hi,
                verdict(lo, hi),
            )
        )
    # (3) early: runs that lost refusal beyond noise; the share lost by the first checkpoint (> 1/2 agrees)
    steps = pd.to_numeric(table["step"], errors="coerce")
    for _, last in final.iterrows():
        run = last["run"]
        base = _base_rate(table, run)
        if not math.isfinite(base) or not rate_gap(base, last["refusal_rate"], n)[1] > 0:
            continue
        rows = table[(table["run"] == run) & (steps > 0)].sort_values("step")
        first = rows.iloc[0]
        share, lo, hi = early_share(base, first["refusal_rate"], last["refusal_rate"], n)
        out.append(
            Comparison(
                "early",
                f"{run}: share of the loss by step {int(first['step'])} (fraction {first['fraction']:g})",
                share,
                lo,
                hi,
                verdict(lo, hi, 0.5),
            )
        )
    return out


def as_frame(comparisons: Sequence[Comparison]) -> pd.DataFrame:
    return pd.DataFrame([c.__dict__ for c in comparisons], columns=list(Comparison.__dataclass_fields__))


def tally(comparisons: Sequence[Comparison]) -> dict[str, dict[str, int]]:
    """claim -> verdict -> count."""
    out: dict[str, dict[str, int]] = {}
    for c in comparisons:
        out.setdefault(c.claim, {}).setdefault(c.verdict, 0)
        out[c.claim][c.verdict] += 1
    return out
