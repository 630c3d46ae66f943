from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from refusal_probe.analysis.correlate import (
    best_layer,
    correlate,
    exact_spearman_p,
    pair_stats,
    per_layer_correlation,
    strongest,
)
from refusal_probe.core.errors import UserError


def test_pair_stats_hand_computed():
    # x = 1..4, y = 2,4,5,4: sum dxdy = 3.5, sum dx^2 = 5, sum dy^2 = 4.75 -> r = 3.5 / sqrt(23.75)
    s = pair_stats(np.array([1, 2, 3, 4]), np.array([2, 4, 5, 4]))
    r = 3.5 / math.sqrt(23.75)
    assert s["n"] == 4
    assert s["pearson_r"] == pytest.approx(r, abs=1e-12)
    # with n = 4 (t distribution, 2 degrees of freedom) the two-sided p-value is exactly 1 - |r|
    assert s["pearson_p"] == pytest.approx(1 - r, abs=1e-9)
    # ranks of y with the tie: 1, 2.5, 4, 2.5 -> rho = 3 / sqrt(5 * 4.5)
    assert s["spearman_rho"] == pytest.approx(3 / math.sqrt(22.5), abs=1e-12)


def test_exact_spearman_p_counts_pairings():
    # a perfect rank order is matched (in |rho|) by itself and its reverse: p = 2 / n!
    assert exact_spearman_p(np.arange(3.0), np.arange(3.0)) == pytest.approx(2 / 6)
    assert exact_spearman_p(np.arange(5.0), -np.arange(5.0)) == pytest.approx(2 / 120)
    # x = 1..4, y ranks 1,2,4,3: rho = 1 - sum(d^2)/10 = 0.8. rho >= 0.8 <=> sum(d^2) <= 2: the identity and the
    # 3 adjacent swaps; rho <= -0.8: their 4 reverses. Two-sided p = 8 / 24.
    assert exact_spearman_p(np.arange(4.0), np.array([1.0, 2.0, 4.0, 3.0])) == pytest.approx(8 / 24)
    assert pair_stats(np.arange(3.0), np.arange(3.0))["spearman_p"] == pytest.approx(1 / 3)  # not scipy's 0
    big = pair_stats(np.arange(12.0), np.arange(12.0) ** 2)  # beyond exact: scipy's t approximation
    assert big["spearman_rho"] == pytest.approx(1.0) and big["spearman_p"] < 1e-6


def test_pair_stats_monotone_constant_and_nonfinite():
    x = np.array([0.1, 0.2, 0.5, 0.9, 1.0])
    s = pair_stats(x, np.exp(-5 * x))  # strictly decreasing, not linear
    assert s["spearman_rho"] == pytest.approx(-1.0)
    assert -1.0 < s["pearson_r"] < -0.9
    s = pair_stats(np.array([1.0, 2.0, np.nan, 4.0, np.inf]), np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert s["n"] == 3 and s["pearson_r"] == pytest.approx(1.0)
    s = pair_stats(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0]))
    assert s["n"] == 3 and np.isnan(s["pearson_r"]) and np.isnan(s["spearman_rho"])
    s = pair_stats(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    assert s["n"] == 2 and np.isnan(s["spearman_rho"])


def _table():
    """Two runs sharing one base (step 0 rows identical); full moves a lot, lora a little."""
    rows = []
    for run, method, cos, refusal in (
        ("full", "full", (1.0, 0.8, 0.6, 0.5), (0.9, 0.6, 0.4, 0.3)),
        ("lora", "lora", (1.0, 0.99, 0.97, 0.96), (0.9, 0.88, 0.87, 0.85)),
    ):
        for i, (c, r) in enumerate(zip(cos, refusal, strict=True)):
            rows.append(
                {
                    "run": run,
                    "method": method,
                    "lr": 5e-5,
                    "step": 10 * i,
                    "fraction": i / 3,
                    "cos_to_base_at_rl": c,
                    "refusal_rate": r,
                    "chrf": 40.0 + i,
                }
            )
    return pd.DataFrame(rows)


def test_correlate_groups_and_base_counted_once():
    res = correlate(_table(), ["cos_to_base_at_rl"], ["refusal_rate", "chrf"])
    assert set(res.columns) >= {
        "x",
        "y",
        "group",
        "n",
        "pearson_r",
        "pearson_p",
        "spearman_rho",
        "spearman_p",
    }
    allr = res[(res["group"] == "all") & (res["y"] == "refusal_rate")].iloc[0]
    assert allr["n"] == 7  # 8 rows, the shared base once
    assert allr["spearman_rho"] == pytest.approx(1.0)  # every lower cos comes with a lower refusal rate
    full = res[(res["group"] == "full") & (res["y"] == "refusal_rate")].iloc[0]
    assert full["n"] == 4 and full["spearman_rho"] == pytest.approx(1.0)
    # full: cos 1,.8,.6,.5 vs refusal .9,.6,.4,.3 -> hand Pearson
    x, y = np.array([1, 0.8, 0.6, 0.5]), np.array([0.9, 0.6, 0.4, 0.3])
    dx, dy = x - x.mean(), y - y.mean()
    assert full["pearson_r"] == pytest.approx((dx @ dy) / math.sqrt((dx @ dx) * (dy @ dy)))
    chrf = res[(res["group"] == "lora") & (res["y"] == "chrf")].iloc[0]
    assert chrf["spearman_rho"] == pytest.approx(-1.0)
    assert sorted(set(res["group"])) == ["all", "full", "lora"]


def test_correlate_small_method_group_skipped_and_defaults():
    t = _table()
    t = t[~((t["run"] == "lora") & (t["step"] >= 20))]  # lora: base + one checkpoint = 2 points
    res = correlate(t)
    assert set(res["x"]) == {"cos_to_base_at_rl"} and set(res["y"]) == {"refusal_rate", "chrf"}
    assert "lora" not in set(res["group"])
    with pytest.raises(UserError, match="not in the checkpoint table"):
        correlate(t, ["nope"], ["refusal_rate"])


def test_strongest_orders_by_abs_rho():
    res = correlate(_table(), ["cos_to_base_at_rl"], ["refusal_rate", "chrf"])
    top = strongest(res, k=3)
    assert len(top) == 3
    assert abs(top["spearman_rho"].iloc[0]) >= abs(top["spearman_rho"].iloc[1])
    # among the perfect (|rho| = 1) pairs, the one over all 7 checkpoints comes first
    assert top.iloc[0][["group", "y", "n"]].tolist() == ["all", "refusal_rate", 7]


def test_per_layer_correlation_finds_tracking_layer():
    drift, beh = [], []
    refusal = {0: 0.9, 10: 0.7, 20: 0.5, 30: 0.2}
    for step, r in refusal.items():
        key = {"run": "full", "method": "full", "lr": 1e-4, "step": step, "fraction": step / 30}
        beh.append({**key, "metric": "refusal_rate", "value": r})
        beh.append({**key, "metric": "chrf", "value": 50.0})
        for layer, cos in ((0, 1.0 - 0.001 * step), (1, 0.5 + 0.3 * np.sin(step)), (2, r + 0.1)):
            drift.append({**key, "layer": layer, "module": "", "metric": "cos_to_base", "value": cos})
    pl = per_layer_correlation(pd.DataFrame(drift), pd.DataFrame(beh))
    assert pl["layer"].tolist()[:3] == [0, 1, 2]
    rho = pl[pl["group"] == "all"].set_index("layer")["spearman_rho"]
    assert rho[0] == pytest.approx(1.0) and rho[2] == pytest.approx(1.0)
    pear = pl[pl["group"] == "all"].set_index("layer")["pearson_r"]
    assert pear[2] == pytest.approx(1.0)  # layer 2 is exactly linear in refusal
    assert best_layer(pl)["layer"] in (0, 2)
    assert abs(rho[1]) < 1.0
    assert per_layer_correlation(pd.DataFrame(drift), None).empty
    assert per_layer_correlation(pd.DataFrame(drift), pd.DataFrame(beh), y="xstest_refusal_rate").empty
