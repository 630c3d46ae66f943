"""Uncertainty of the correlations over checkpoints: a bootstrap that resamples runs, and partial correlation.

Checkpoints of one run are not independent, so the bootstrap draws whole runs (clusters) with replacement: every
checkpoint of a drawn run comes with it, as many times as the run was drawn. The base model is step 0 of every run;
as in ``correlate.dedupe_base`` it counts once per distinct base: a base row is in a resample (once) when at least
one run that shares it was drawn. A resample is a weight per row (how many copies of that row it holds), so the
statistics are computed for all resamples at once as weighted Pearson / Spearman, with numpy, which equals the same
statistic over the materialised copies.

Refusal rates are binomial: ``wilson`` gives a rate's interval from the n prompts it was judged on, ``newcombe_diff``
the interval of a change between two rates (the report's findings, Figures 1 and 2 and its label table use these).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

N_BOOT = 2000  # run resamples per interval
SEED = 0
LEVEL = 0.95
MIN_POINTS = 3  # as correlate.MIN_POINTS: fewer points (with copies) give no correlation
Z95 = 1.959963984540054  # two-sided 95% standard normal quantile
MIN_POINTS_PARTIAL = 4  # a partial correlation spends one more degree of freedom
CI_COLUMNS = (
    "pearson_ci_low",
    "pearson_ci_high",
    "spearman_ci_low",
    "spearman_ci_high",
    "n_runs",
    "n_points",
)


def base_keys(values: np.ndarray, is_base: np.ndarray) -> np.ndarray:
    """An integer key per row: -1 for a checkpoint, the same key for base rows with identical values (12 decimals)."""
    keys = np.full(len(is_base), -1, dtype=np.intp)
    if not len(keys):
        return keys
    values = np.asarray(values, dtype=np.float64).reshape(len(is_base), -1)
    idx = np.flatnonzero(np.asarray(is_base, dtype=bool))
    if len(idx):
        _, inv = np.unique(np.round(values[idx], 12), axis=0, return_inverse=True)
        keys[idx] = np.asarray(inv).reshape(-1)
    return keys


def resample_weights(run_codes: np.ndarray, keys: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B, n) copies of each row in each resample. ``counts`` (B, n_runs): how often each run was drawn.

    A checkpoint row gets its run's count; a base row gets 1 if any run holding that base (same key) was drawn, and
    only its first row carries it (the others get 0), so a shared base counts once.
    """
    run_codes = np.asarray(run_codes, dtype=np.intp)
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    w = counts[:, run_codes]
    for k in np.unique(keys[keys >= 0]):
        rows = np.flatnonzero(keys == k)
        present = (counts[:, np.unique(run_codes[rows])] > 0).any(axis=1)
        w[:, rows] = 0.0
        w[:, rows[0]] = present.astype(np.float64)
    return w


def weighted_ranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B, n) average ranks (1-based, ties averaged) of x in each resample, as if each row were copied w times."""
    x = np.asarray(x, dtype=np.float64)
    below = w @ (x[None, :] < x[:, None]).T.astype(np.float64)
    tied = w @ (x[None, :] == x[:, None]).T.astype(np.float64)
    return below + (tied + 1.0) / 2.0


def _spread(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    xb = np.broadcast_to(x, w.shape)
    present = w > 0
    hi = np.where(present, xb, -np.inf).max(axis=1)
    lo = np.where(present, xb, np.inf).min(axis=1)
    return hi - lo


def weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B,) Pearson r of x and y with row weights w (B, n); x, y may be (n,) or (B, n). NaN below 3 points
    (counting copies) or for a constant input, as ``correlate.pair_stats``."""
    x = np.broadcast_to(np.asarray(x, dtype=np.float64), w.shape)
    y = np.broadcast_to(np.asarray(y, dtype=np.float64), w.shape)
    m = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dx = x - ((w * x).sum(axis=1) / m)[:, None]
        dy = y - ((w * y).sum(axis=1) / m)[:, None]
        r = (w * dx * dy).sum(axis=1) / np.sqrt((w * dx * dx).sum(axis=1) * (w * dy * dy).sum(axis=1))
    bad = (m < MIN_POINTS) | (_spread(x, w) == 0) | (_spread(y, w) == 0)
    return np.where(bad, np.nan, np.clip(r, -1.0, 1.0))


def weighted_spearman(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B,) Spearman rho: Pearson r of the average ranks within each resample."""
    return weighted_pearson(weighted_ranks(x, w), weighted_ranks(y, w), w)


def _partial(r_xy: np.ndarray, r_xz: np.ndarray, r_yz: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        den = np.sqrt((1.0 - r_xz**2) * (1.0 - r_yz**2))
        r = (r_xy - r_xz * r_yz) / den
    return np.where(den > 1e-12, np.clip(r, -1.0, 1.0), np.nan)


def weighted_partial(x: np.ndarray, y: np.ndarray, z: np.ndarray, w: np.ndarray, *, rank: bool) -> np.ndarray:
    """(B,) partial correlation of x and y given z with row weights (closed form over weighted correlations);
    rank=True ranks x, y, z within each resample first (Spearman variant)."""
    if rank:
        x, y, z = (weighted_ranks(v, w) for v in (x, y, z))
    r = _partial(weighted_pearson(x, y, w), weighted_pearson(x, z, w), weighted_pearson(y, z, w))
    return np.where(w.sum(axis=1) < MIN_POINTS_PARTIAL, np.nan, r)


def _residuals(v: np.ndarray, z: np.ndarray) -> np.ndarray:
    design = np.column_stack([np.ones_like(z), z])
    coef, *_ = np.linalg.lstsq(design, v, rcond=None)
    return v - design @ coef


def partial_corr(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, z: Sequence[float] | np.ndarray
) -> dict[str, float]:
    """Partial correlation of x with y controlling for z, over the points where all three are finite.

    x and y are each residualised on z (least squares with an intercept) and the residuals are correlated
    (Pearson); the Spearman variant does the same on the ranks of x, y and z. NaN below 4 points, or when z
    explains x or y exactly (no residual left).
    """
    from scipy import stats

    xa, ya, za = (np.asarray(v, dtype=np.float64) for v in (x, y, z))
    ok = np.isfinite(xa) & np.isfinite(ya) & np.isfinite(za)
    xa, ya, za = xa[ok], ya[ok], za[ok]
    out = {"n": int(ok.sum()), "pearson_r": np.nan, "spearman_rho": np.nan}
    if len(xa) < MIN_POINTS_PARTIAL or min(np.ptp(xa), np.ptp(ya), np.ptp(za)) == 0:
        return out
    for name, (a, b, c) in (
        ("pearson_r", (xa, ya, za)),
        ("spearman_rho", tuple(stats.rankdata(v) for v in (xa, ya, za))),
    ):
        ra, rb = _residuals(a, c), _residuals(b, c)
        scale = max(1.0, float(np.abs(a).max()), float(np.abs(b).max()))
        if min(np.abs(ra).max(), np.abs(rb).max()) <= 1e-10 * scale:
            continue
        out[name] = float(np.clip(np.corrcoef(ra, rb)[0, 1], -1.0, 1.0))
    return out


def draw_runs(n_runs: int, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """(n_boot, n_runs) run indices drawn with replacement, seeded."""
    return np.random.default_rng(seed).integers(0, n_runs, size=(n_boot, n_runs))


def run_bootstrap(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    runs: Sequence[object] | np.ndarray,
    is_base: Sequence[bool] | np.ndarray,
    z: Sequence[float] | np.ndarray | None = None,
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    resamples: np.ndarray | None = None,
    level: float = LEVEL,
) -> dict[str, float]:
    """Percentile interval of Pearson r and Spearman rho (partial on z when given) from resampling runs.

    Rows are checkpoints (one per run and step, base rows included once per run as in the checkpoint table); rows
    where x, y (or z) is not finite are dropped first. ``resamples`` (B, n_runs) lists the run indices of each
    resample (runs numbered in sorted order of their names); by default ``n_boot`` resamples are drawn with
    ``seed``. The interval is the (1 - level)/2 and (1 + level)/2 percentiles (numpy's linear interpolation) of the
    resamples whose statistic is defined. NaN with fewer than 2 runs. Also returns n_runs and n_points (the distinct
    points of the estimate: the base once per distinct base).
    """
    cols = [np.asarray(v, dtype=np.float64) for v in ((x, y) if z is None else (x, y, z))]
    ok = np.logical_and.reduce([np.isfinite(c) for c in cols])
    cols = [c[ok] for c in cols]
    run_arr = np.asarray(runs, dtype=object)[ok]
    base = np.asarray(is_base, dtype=bool)[ok]
    names, codes = np.unique(run_arr.astype(str), return_inverse=True)
    keys = base_keys(np.column_stack(cols) if cols[0].size else np.empty((0, len(cols))), base)
    n_runs = len(names)
    n_points = int(resample_weights(codes, keys, np.ones((1, n_runs))).sum()) if n_runs else 0
    out: dict[str, float] = {c: np.nan for c in CI_COLUMNS[:4]}
    out.update(n_runs=n_runs, n_points=n_points)
    if n_runs < 2:
        return out
    draws = draw_runs(n_runs, n_boot, seed) if resamples is None else np.atleast_2d(np.asarray(resamples))
    counts = np.zeros((len(draws), n_runs))
    np.add.at(counts, (np.repeat(np.arange(len(draws)), draws.shape[1]), draws.reshape(-1)), 1.0)
    w = resample_weights(codes, keys, counts)
    if z is None:
        pear, spear = weighted_pearson(cols[0], cols[1], w), weighted_spearman(cols[0], cols[1], w)
    else:
        pear = weighted_partial(cols[0], cols[1], cols[2], w, rank=False)
        spear = weighted_partial(cols[0], cols[1], cols[2], w, rank=True)
    q = [50 * (1 - level), 50 * (1 + level)]
    for name, vals in (("pearson", pear), ("spearman", spear)):
        vals = vals[np.isfinite(vals)]
        if len(vals):
            lo, hi = np.percentile(vals, q)
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = float(lo), float(hi)
    return out


def within_run(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    runs: Sequence[object] | np.ndarray,
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    resamples: np.ndarray | None = None,
    level: float = LEVEL,
) -> dict[str, float]:
    """Correlation over the steps of each run, summarised across runs, with a run-bootstrap interval.

    Each run's rows (its base, step 0, included) give a Pearson r and a Spearman rho over the points where x and y
    are finite (NaN below 3 points or for a constant input). The summary is the unweighted mean over the runs whose
    rho is defined (the contributing runs); the interval is the percentile interval of that mean over resamples
    that draw contributing runs with replacement (``resamples`` (B, n_runs) indexes them in sorted order of their
    names). n is the points of the contributing runs, n_runs their number; no interval below 2 of them.
    """
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    run_arr = np.asarray(runs, dtype=object).astype(str)
    ok = np.isfinite(xa) & np.isfinite(ya)
    per_run = []
    for r in np.unique(run_arr):
        xr, yr = xa[ok & (run_arr == r)], ya[ok & (run_arr == r)]
        if len(xr) < MIN_POINTS:
            per_run.append({"n": len(xr), "pearson_r": np.nan, "spearman_rho": np.nan})
            continue
        w = np.ones((1, len(xr)))
        per_run.append(
            {
                "n": len(xr),
                "pearson_r": float(weighted_pearson(xr, yr, w)[0]),
                "spearman_rho": float(weighted_spearman(xr, yr, w)[0]),
            }
        )
    used = [s for s in per_run if np.isfinite(s["spearman_rho"])]
    out: dict[str, float] = {c: np.nan for c in CI_COLUMNS[:4]}
    out.update(
        n=int(sum(s["n"] for s in used)),
        n_runs=len(used),
        n_points=int(sum(s["n"] for s in used)),
        pearson_r=float(np.mean([s["pearson_r"] for s in used])) if used else np.nan,
        spearman_rho=float(np.mean([s["spearman_rho"] for s in used])) if used else np.nan,
    )
    if len(used) < 2:
        return out
    draws = draw_runs(len(used), n_boot, seed) if resamples is None else np.atleast_2d(np.asarray(resamples))
    q = [50 * (1 - level), 50 * (1 + level)]
    for name, key in (("pearson", "pearson_r"), ("spearman", "spearman_rho")):
        vals = np.array([s[key] for s in used])[draws].mean(axis=1)
        vals = vals[np.isfinite(vals)]
        if len(vals):
            lo, hi = np.percentile(vals, q)
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = float(lo), float(hi)
    return out


# ----------------------------------------------------------------------------------------------- refusal rates


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes of n (NaN, NaN for n < 1)."""
    if n < 1 or not math.isfinite(k):
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate_interval(rate: float, n: int) -> tuple[float, float]:
    """Wilson 95% interval of a refusal rate judged on n prompts (its count is round(rate * n)); NaN for NaN."""
    rate = float(rate)
    return wilson(round(rate * n), n) if math.isfinite(rate) else (math.nan, math.nan)


def newcombe_diff(k1: float, n1: int, k2: float, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (his method 10) for p2 - p1, from the two Wilson intervals."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p2 - p1
    return (d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2))
