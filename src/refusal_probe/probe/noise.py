"""Noise floors of the drift measures: how much a direction moves from sampling n prompts alone, and what a
projection gap looks like along a direction that means nothing.

Pure numpy (float64) over captured activations; each function returns per-layer arrays and ``noise_rows`` turns
them into the tidy ``{"layer", "metric", "value"}`` rows that ``drift_rows`` also returns.

- ``split_half``: the difference-of-means direction from two disjoint random halves of the harmful and harmless
  prompts, cosine per layer, over several seeded splits (mean and sd). It is the cosine between two independent
  n/2-prompt directions of one model; ``split_half_cos_sb`` steps it up to n prompts (Spearman-Brown, 2r/(1+r)):
  under noise that is independent of the direction and spread over many dimensions, cos ~= |mu|^2 / (|mu|^2 + v)
  with v the noise variance of one estimate, and halving v turns r into 2r/(1+r).
- ``bootstrap_cos``: harmful and harmless prompts resampled with replacement (independently, seeded, the same
  resamples at every checkpoint since the prompts are the same), the direction recomputed, and its cosine with the
  fixed base direction; the 2.5 and 97.5 percentiles per layer. At the base itself the interval sits below 1: that
  is the floor a checkpoint's cos_to_base is read against. The base direction is held fixed, so the interval is the
  checkpoint side's sampling noise only.
- ``random_gap``: the harmful-minus-harmless gap of mean projections on k random unit directions (seeded, the same
  at every checkpoint and layer). Its mean is 0 in expectation and its sd ~= |direction| / sqrt(d): the proj_gap on
  the base's refusal direction is read against it (a gap of several sd is not chance alignment).
"""

from __future__ import annotations

import warnings

import numpy as np

from refusal_probe.core.errors import UserError
from refusal_probe.probe.activations import Activations

NOISE_METRICS = (
    "split_half_cos",
    "split_half_cos_sd",
    "split_half_cos_sb",
    "cos_to_base_ci_low",
    "cos_to_base_ci_high",
    "proj_gap_random_mean",
    "proj_gap_random_sd",
)
NOISE_DOCS = {
    "split_half_cos": "mean over seeded splits of the cosine between the directions of two disjoint halves of the "
    "prompts (this model's own sampling floor at n/2 prompts per class)",
    "split_half_cos_sd": "sd of split_half_cos over the splits",
    "split_half_cos_sb": "split_half_cos stepped up to n prompts (Spearman-Brown 2r/(1+r)): expected cosine of two "
    "independent n-prompt directions of the same model",
    "cos_to_base_ci_low": "2.5 percentile of cos_to_base over bootstrap resamples of this model's prompts (base "
    "direction fixed; at the base itself: the floor)",
    "cos_to_base_ci_high": "97.5 percentile of the same bootstrap",
    "proj_gap_random_mean": "mean harmful-minus-harmless projection gap on seeded random unit directions (0 expected)",
    "proj_gap_random_sd": "sd of that gap over the random directions (~ |direction| / sqrt(d)): the chance scale "
    "proj_gap is read against",
}
LEVEL = 0.95
CHUNK_BYTES = 64 << 20  # float64 resampled directions held at once by the bootstrap


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis (broadcast), NaN where either vector is zero, clipped to [-1, 1]."""
    num = (a * b).sum(axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    return np.where(den > 0, np.clip(out, -1.0, 1.0), np.nan)


def _per_prompt(acts: Activations, p: int, what: str) -> np.ndarray:
    if acts.per_prompt is None:
        raise UserError(f"{what} needs per-prompt activations: capture the prompt sets with keep=True")
    return _np(acts.per_prompt[:, :, p])  # [n, L, d]


def _np(x) -> np.ndarray:
    """float64 numpy array of a tensor (any device/dtype) or array."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def _sd(x: np.ndarray, axis: int) -> np.ndarray:
    """Sample sd (ddof 1) ignoring NaN; NaN with fewer than 2 finite values."""
    ok = np.isfinite(x).sum(axis=axis)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        sd = np.nanstd(x, axis=axis, ddof=1)
    return np.where(ok >= 2, sd, np.nan)


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN layer (a zero direction) stays NaN
        return np.nanmean(x, axis=axis)


def split_half(
    harmful: np.ndarray, harmless: np.ndarray, n_splits: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd over ``n_splits`` seeded splits of the per-layer cosine between the directions of two disjoint
    halves. ``harmful`` [n_h, L, d], ``harmless`` [n_l, L, d]; each class is shuffled and cut into two halves of
    floor(n/2) prompts (an odd prompt out is left out of that split)."""
    n_h, n_l = len(harmful), len(harmless)
    if min(n_h, n_l) < 2 or n_splits < 1:
        raise UserError(
            f"a split-half cosine needs at least 2 prompts per class and 1 split, got {n_h} harmful, "
            f"{n_l} harmless and {n_splits} split(s)"
        )
    rng = np.random.default_rng(seed)

    def half_weights(n: int) -> tuple[np.ndarray, np.ndarray]:
        h = n // 2
        a, b = np.zeros((n_splits, n)), np.zeros((n_splits, n))
        for s in range(n_splits):
            perm = rng.permutation(n)
            a[s, perm[:h]] = 1.0 / h
            b[s, perm[h : 2 * h]] = 1.0 / h
        return a, b

    ha, hb = half_weights(n_h)
    la, lb = half_weights(n_l)
    shape = harmful.shape[1:]
    flat_h, flat_l = harmful.reshape(n_h, -1), harmless.reshape(n_l, -1)
    dir_a = (ha @ flat_h - la @ flat_l).reshape(n_splits, *shape)
    dir_b = (hb @ flat_h - lb @ flat_l).reshape(n_splits, *shape)
    cos = _cos(dir_a, dir_b)  # [S, L]
    return _nanmean(cos, 0), _sd(cos, 0)


def spearman_brown(r: np.ndarray) -> np.ndarray:
    """2r / (1 + r): a half-sample cosine stepped up to the full sample; NaN where r <= 0 (no signal to step up)."""
    r = np.asarray(r, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(r > 0, 2 * r / (1 + r), np.nan)


def resample_counts(rng: np.random.Generator, n_boot: int, n: int) -> np.ndarray:
    """(n_boot, n) how often each prompt is drawn in each resample of n with replacement."""
    draws = rng.integers(0, n, size=(n_boot, n))
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n), draws.reshape(-1)), 1.0)
    return counts


def bootstrap_cos(
    harmful: np.ndarray,
    harmless: np.ndarray,
    base_dir: np.ndarray,
    n_boot: int,
    seed: int,
    level: float = LEVEL,
    counts: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per layer of cos(resampled direction, ``base_dir`` [L, d]).

    ``harmful`` [n_h, L, d] and ``harmless`` [n_l, L, d] are resampled independently with replacement ``n_boot``
    times (seeded), or as given by ``counts`` (copies of each prompt per resample, shapes (B, n_h) and (B, n_l)).
    Resamples whose cosine is undefined (a zero direction) are dropped; a layer with none left is NaN.
    """
    n_h, n_l = len(harmful), len(harmless)
    if counts is None:
        if n_boot < 1:
            raise UserError(f"a bootstrap interval needs at least 1 resample, got {n_boot}")
        rng = np.random.default_rng(seed)
        counts = (resample_counts(rng, n_boot, n_h), resample_counts(rng, n_boot, n_l))
    ch, cl = (np.atleast_2d(np.asarray(c, dtype=np.float64)) for c in counts)
    # copies -> weights of a weighted mean
    ch, cl = ch / ch.sum(axis=1, keepdims=True), cl / cl.sum(axis=1, keepdims=True)
    flat_h, flat_l = harmful.reshape(n_h, -1), harmless.reshape(n_l, -1)
    shape = harmful.shape[1:]
    chunk = max(1, CHUNK_BYTES // (8 * flat_h.shape[1]))
    cos = np.concatenate(
        [
            _cos((ch[i : i + chunk] @ flat_h - cl[i : i + chunk] @ flat_l).reshape(-1, *shape), base_dir)
            for i in range(0, len(ch), chunk)
        ]
    )  # [B, L]
    q = [50 * (1 - level), 50 * (1 + level)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN layer stays NaN
        lo, hi = np.nanpercentile(cos, q, axis=0)
    return lo, hi


def random_gap(direction: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd over ``k`` seeded random unit directions u of ``direction`` [L, d] . u: the harmful-minus-harmless
    projection gap (projection is linear, so the gap of mean projections is the difference of means projected)."""
    if k < 2:
        raise UserError(f"a random-direction control needs at least 2 directions, got {k}")
    d = direction.shape[-1]
    u = np.random.default_rng(seed).standard_normal((k, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    gaps = direction @ u.T  # [L, k]
    return gaps.mean(axis=1), gaps.std(axis=1, ddof=1)


def noise_rows(
    base_dirs,
    ckpt_dirs,
    harmful: Activations,
    harmless: Activations,
    position: int,
    *,
    n_boot: int,
    n_splits: int,
    n_random: int,
    seed: int,
) -> list[dict]:
    """Tidy per-layer rows of the noise floors of one model's directions at ``position`` (0 turns a measure off).

    ``base_dirs`` and ``ckpt_dirs`` are the [L, P, d] difference-of-means directions of the base and of this model
    (the same tensor when the base is measured against itself). Split-half and bootstrap need per-prompt
    activations; the random-direction control needs only the direction.
    """
    p = harmful.index(position)
    base, ckpt = _np(base_dirs[:, p]), _np(ckpt_dirs[:, p])  # [L, d]
    cols: dict[str, np.ndarray] = {}
    if n_splits or n_boot:
        h, hl = _per_prompt(harmful, p, "the noise floor"), _per_prompt(harmless, p, "the noise floor")
        if n_splits:
            mean, sd = split_half(h, hl, n_splits, seed)
            cols.update(split_half_cos=mean, split_half_cos_sd=sd, split_half_cos_sb=spearman_brown(mean))
        if n_boot:
            cols["cos_to_base_ci_low"], cols["cos_to_base_ci_high"] = bootstrap_cos(h, hl, base, n_boot, seed)
    if n_random:
        cols["proj_gap_random_mean"], cols["proj_gap_random_sd"] = random_gap(ckpt, n_random, seed)
    return [
        {"layer": layer, "metric": m, "value": float(cols[m][layer])}
        for layer in range(base.shape[0])
        for m in NOISE_METRICS
        if m in cols
    ]
