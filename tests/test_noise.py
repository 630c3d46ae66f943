"""Noise floors of the drift measures (probe/noise.py) against hand-computed values and known expectations."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from refusal_probe.analysis.settings import AnalyzeSettings
from refusal_probe.core.errors import UserError
from refusal_probe.probe.activations import Activations
from refusal_probe.probe.noise import (
    NOISE_METRICS,
    bootstrap_cos,
    noise_rows,
    random_gap,
    spearman_brown,
    split_half,
)


def test_split_half_four_prompt_toy_has_known_halves():
    # 2 harmful, 2 identical harmless prompts: every split puts harmful 0 in one half and harmful 1 in the other,
    # so the two half directions are h0 - l and h1 - l whatever the seed
    h = np.array([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [2.0, 0.0]]])  # [n=2, L=2, d=2]
    harmless = np.zeros((2, 2, 2))
    mean, sd = split_half(h, harmless, n_splits=5, seed=0)
    assert mean[0] == pytest.approx(0.0, abs=1e-15)  # (1,0) against (0,1)
    assert mean[1] == pytest.approx(1 / math.sqrt(2))  # (1,1) against (2,0): 2 / (sqrt 2 * 2)
    assert sd.tolist() == [0.0, 0.0]
    sb = spearman_brown(mean)
    assert np.isnan(sb[0]) and sb[1] == pytest.approx(2 * (1 / math.sqrt(2)) / (1 + 1 / math.sqrt(2)))
    # one split: no spread to report
    assert np.isnan(split_half(h, harmless, n_splits=1, seed=0)[1]).all()
    with pytest.raises(UserError, match="at least 2 prompts per class"):
        split_half(h[:1], harmless, n_splits=5, seed=0)


def test_split_half_matches_the_signal_to_noise_expectation():
    # mu along e1 (|mu| = 1), isotropic noise sd s in d dims, n prompts per class: a half direction has noise
    # variance v = 2 * s^2 * d / (n/2) (harmful and harmless), so cos(half, half) ~ 1 / (1 + v); here v = 1, and
    # the cross term of the two halves' noise (sd v / sqrt(d) = 0.02) keeps the cosine within about 0.01 of it
    rng = np.random.default_rng(5)
    n, d, s = 400, 2500, 0.2
    mu = np.zeros(d)
    mu[0] = 1.0
    h = (mu + s * rng.standard_normal((n, d)))[:, None, :]
    harmless = (s * rng.standard_normal((n, d)))[:, None, :]
    v = 2 * s**2 * d / (n / 2)
    mean, sd = split_half(h, harmless, n_splits=20, seed=1)
    assert mean[0] == pytest.approx(1 / (1 + v), abs=0.03)
    assert 0 < sd[0] < 0.05
    # stepped up to n prompts it predicts the cosine of two independent n-prompt directions: 1 / (1 + v / 2)
    assert spearman_brown(mean)[0] == pytest.approx(1 / (1 + v / 2), abs=0.03)


def test_bootstrap_interval_zero_width_when_every_resample_is_the_same():
    # all harmful prompts equal, all harmless equal: every resample has direction (1, 1) - (0, 1) = (1, 0)
    h = np.tile(np.array([[1.0, 1.0]]), (6, 1, 1))  # [6, L=1, 2]
    harmless = np.tile(np.array([[0.0, 1.0]]), (4, 1, 1))
    base = np.array([[1.0, 1.0]])
    lo, hi = bootstrap_cos(h, harmless, base, n_boot=50, seed=0)
    assert lo[0] == hi[0] == pytest.approx(1 / math.sqrt(2))


def test_bootstrap_interval_hand_worked_resamples():
    # harmful (1,0) and (0,1), one harmless (0,0); resample 1 draws harmful 0 twice, resample 2 harmful 1 twice
    h = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    harmless = np.zeros((1, 1, 2))
    base = np.array([[1.0, 0.0]])
    counts = (np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([[1.0], [1.0]]))
    lo, hi = bootstrap_cos(h, harmless, base, n_boot=0, seed=0, counts=counts)
    # cosines 1 and 0: numpy's linear-interpolated 2.5 and 97.5 percentiles of {0, 1}
    assert lo[0] == pytest.approx(0.025) and hi[0] == pytest.approx(0.975)
    # seeded: the same seed gives the same interval, vectorised over layers
    rng = np.random.default_rng(0)
    big_h, big_l = rng.standard_normal((10, 3, 4)), rng.standard_normal((8, 3, 4))
    base3 = big_h.mean(0) - big_l.mean(0)
    a = bootstrap_cos(big_h, big_l, base3, n_boot=200, seed=3)
    b = bootstrap_cos(big_h, big_l, base3, n_boot=200, seed=3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert (a[0] <= a[1]).all() and (a[1] <= 1.0).all()


def test_random_gap_has_the_known_expectation():
    # a direction of norm 2 along e1 in d = 4: gap = 2 u1 with u uniform on the sphere, E = 0, E[gap^2] = 4 / d = 1
    direction = np.array([[2.0, 0.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mean, sd = random_gap(direction, k=20000, seed=0)
    # sd(u1^2) = 1/4 for d = 4 (Beta(1/2, 3/2)), so the sd of gap^2 is 1 and its mean is 1 +- 0.007 at k = 20000
    assert mean[0] == pytest.approx(0.0, abs=0.03)
    assert sd[0] ** 2 == pytest.approx(1.0, abs=0.04)
    # the same random directions at every layer: the flipped direction flips the mean, keeps the sd
    assert mean[1] == pytest.approx(-mean[0], abs=1e-15) and sd[1] == pytest.approx(sd[0], abs=1e-15)
    assert mean[2] == 0.0 and sd[2] == 0.0
    with pytest.raises(UserError, match="at least 2"):
        random_gap(direction, k=1, seed=0)


def _acts(per_prompt: np.ndarray) -> Activations:
    pp = torch.as_tensor(per_prompt, dtype=torch.float32)  # [n, L, P, d]
    return Activations(
        mean=pp.double().mean(0), n=pp.shape[0], positions=list(range(-pp.shape[2], 0)), per_prompt=pp
    )


def test_noise_rows_tidy_and_switchable():
    rng = np.random.default_rng(2)
    harmful = _acts(rng.standard_normal((6, 3, 2, 5)) + 1.0)
    harmless = _acts(rng.standard_normal((6, 3, 2, 5)))
    dirs = harmful.mean - harmless.mean
    rows = noise_rows(dirs, dirs, harmful, harmless, -1, n_boot=50, n_splits=4, n_random=10, seed=0)
    assert len(rows) == 3 * len(NOISE_METRICS)
    t = {(r["layer"], r["metric"]): r["value"] for r in rows}
    for layer in range(3):
        # the base against itself: its resampled directions fall short of cosine 1
        assert t[layer, "cos_to_base_ci_low"] <= t[layer, "cos_to_base_ci_high"] <= 1.0
        assert -1.0 <= t[layer, "split_half_cos"] <= 1.0
    only_random = noise_rows(dirs, dirs, harmful, harmless, -1, n_boot=0, n_splits=0, n_random=10, seed=0)
    assert {r["metric"] for r in only_random} == {"proj_gap_random_mean", "proj_gap_random_sd"}
    bare = Activations(mean=harmful.mean, n=6, positions=harmful.positions)  # no per-prompt activations
    with pytest.raises(UserError, match="per-prompt"):
        noise_rows(dirs, dirs, bare, bare, -1, n_boot=50, n_splits=0, n_random=0, seed=0)


def test_noise_settings_validated():
    assert AnalyzeSettings().check().keep_per_prompt()
    assert not AnalyzeSettings(separability=False, n_boot_prompts=0, n_split_halves=0).keep_per_prompt()
    for kw, msg in (
        ({"n_boot_prompts": 5}, "--n-boot-prompts 5: pass 0 (off) or at least 20"),
        ({"n_random_directions": -1}, "--n-random-directions -1"),
        ({"n_split_halves": -2}, "--n-split-halves -2"),
        ({"n_prompts": 1, "separability": False}, "--n-split-halves 0"),
    ):
        with pytest.raises(UserError, match=re.escape(msg)):
            AnalyzeSettings(**kw).check()
