from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from refusal_probe.analysis.correlate import (
    CORRELATIONS_HOW,
    SCOPES,
    best_layer,
    correlate,
    exact_spearman_p,
    final_checkpoints,
    pair_stats,
    per_layer_correlation,
    per_layer_correlations,
    pooled_layers,
    strongest,
)
from refusal_probe.analysis.uncertainty import partial_corr, run_bootstrap, weighted_ranks, within_run
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
    assert sorted(set(res.loc[res["scope"] == "pooled", "group"])) == ["all", "full", "lora"]


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


# ------------------------------------------------------------------------- run bootstrap and partial correlation


def _three_runs():
    """3 runs sharing one base (step 0, identical values) with 2 checkpoints each: 9 rows, 7 distinct points."""
    x = [1.0, 0.9, 0.7, 1.0, 0.95, 0.9, 1.0, 0.6, 0.5]
    y = [0.9, 0.8, 0.5, 0.9, 0.7, 0.85, 0.9, 0.4, 0.45]
    runs = ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    step = [0, 10, 20] * 3
    return np.array(x), np.array(y), np.array(runs), np.array(step) == 0


def test_run_bootstrap_equals_percentiles_over_exact_enumeration():
    x, y, runs, is_base = _three_runs()
    draws = np.array(list(itertools.product(range(3), repeat=3)))  # all 27 equally likely run resamples
    res = run_bootstrap(x, y, runs, is_base, resamples=draws)
    assert res["n_runs"] == 3 and res["n_points"] == 7
    pear, spear = [], []
    for draw in draws:
        # materialise the resample: the base once, then every checkpoint of each drawn run (copies included)
        idx = [0] + [i for r in draw for i in range(3 * r + 1, 3 * r + 3)]
        s = pair_stats(x[idx], y[idx])
        pear.append(s["pearson_r"])
        spear.append(s["spearman_rho"])
    for name, vals in (("pearson", pear), ("spearman", spear)):
        vals = np.array(vals)
        lo, hi = np.percentile(vals[np.isfinite(vals)], [2.5, 97.5])
        assert res[f"{name}_ci_low"] == pytest.approx(lo, abs=1e-12)
        assert res[f"{name}_ci_high"] == pytest.approx(hi, abs=1e-12)
    # the resample that draws each run once is the data itself: a zero-width interval at the point estimate
    same = run_bootstrap(x, y, runs, is_base, resamples=np.array([[0, 1, 2]]))
    point = pair_stats(x[[0, 1, 2, 4, 5, 7, 8]], y[[0, 1, 2, 4, 5, 7, 8]])
    assert same["pearson_ci_low"] == same["pearson_ci_high"] == pytest.approx(point["pearson_r"], abs=1e-12)
    assert same["spearman_ci_low"] == pytest.approx(point["spearman_rho"], abs=1e-12)


def test_weighted_ranks_average_ties_over_copies():
    # values 3, 1, 3 with copies 1, 2, 1 -> data 3, 1, 1, 3: ranks of 1 = 1.5, of 3 = 3.5
    ranks = weighted_ranks(np.array([3.0, 1.0, 3.0]), np.array([[1.0, 2.0, 1.0]]))
    assert ranks.tolist() == [[3.5, 1.5, 3.5]]


def test_run_bootstrap_seeded_and_too_few_runs():
    x, y, runs, is_base = _three_runs()
    a = run_bootstrap(x, y, runs, is_base, n_boot=200, seed=3)
    assert a == run_bootstrap(x, y, runs, is_base, n_boot=200, seed=3)
    assert a["pearson_ci_low"] <= a["pearson_ci_high"]
    one = run_bootstrap(x[:3], y[:3], runs[:3], is_base[:3])
    assert one["n_runs"] == 1 and one["n_points"] == 3 and np.isnan(one["pearson_ci_low"])


def test_run_level_interval_wider_than_checkpoint_level_for_clustered_data():
    # 6 runs whose 5 checkpoints sit tightly around a run-level point: 30 checkpoints, but only 6 independent runs
    rng = np.random.default_rng(1)
    centre_x = rng.normal(size=6)
    centre_y = 0.5 * centre_x + rng.normal(size=6)
    x = np.repeat(centre_x, 5) + 0.05 * rng.normal(size=30)
    y = np.repeat(centre_y, 5) + 0.05 * rng.normal(size=30)
    runs = np.repeat(np.arange(6), 5)
    no_base = np.zeros(30, dtype=bool)
    by_run = run_bootstrap(x, y, runs, no_base)
    by_checkpoint = run_bootstrap(x, y, np.arange(30), no_base)  # every checkpoint its own cluster
    assert by_run["n_runs"] == 6 and by_checkpoint["n_runs"] == 30
    for name in ("pearson", "spearman"):
        width_run = by_run[f"{name}_ci_high"] - by_run[f"{name}_ci_low"]
        width_ckpt = by_checkpoint[f"{name}_ci_high"] - by_checkpoint[f"{name}_ci_low"]
        assert width_run > 1.5 * width_ckpt


def _closed_form(a, b, c):
    r = np.corrcoef(np.vstack([a, b, c]))
    return (r[0, 1] - r[0, 2] * r[1, 2]) / math.sqrt((1 - r[0, 2] ** 2) * (1 - r[1, 2] ** 2))


def test_partial_corr_hand_worked():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, 6.0])
    z = np.array([1.0, 3.0, 2.0, 5.0, 4.0])
    # by hand: dx = -2..2, dy = -1.2,-2.2,.8,-.2,2.8, dz = -2,0,-1,2,1; Sxx = 10, Syy = 14.8, Szz = 10,
    # Sxy = 10, Sxz = 8, Syz = 4 -> r_xy = 10/sqrt(148), r_xz = 0.8, r_yz = 4/sqrt(148)
    r_xy, r_xz, r_yz = 10 / math.sqrt(148), 0.8, 4 / math.sqrt(148)
    expected = (r_xy - r_xz * r_yz) / math.sqrt((1 - r_xz**2) * (1 - r_yz**2))
    assert expected == pytest.approx(_closed_form(x, y, z), abs=1e-12)
    p = partial_corr(x, y, z)
    assert p["n"] == 5 and p["pearson_r"] == pytest.approx(expected, abs=1e-12)
    # Spearman variant: the same on ranks (y ranks 2,1,4,3,5)
    assert p["spearman_rho"] == pytest.approx(_closed_form(x, [2, 1, 4, 3, 5], z), abs=1e-12)
    # the bootstrap's weighted closed form agrees at the data itself (each point its own run, drawn once)
    same = run_bootstrap(x, y, np.arange(5), np.zeros(5, dtype=bool), z, resamples=np.arange(5)[None])
    assert same["pearson_ci_low"] == pytest.approx(expected, abs=1e-12)
    assert same["spearman_ci_high"] == pytest.approx(p["spearman_rho"], abs=1e-12)
    # z explaining y exactly leaves nothing to correlate; too few points gives NaN
    assert np.isnan(partial_corr(x, 2 * z + 1, z)["pearson_r"])
    assert np.isnan(partial_corr(x[:3], y[:3], z[:3])["pearson_r"])


def test_correlate_adds_run_intervals_and_partial_rows():
    t = _table()
    t["delta_fro_total"] = [0.0, 1.0, 2.0, 3.0, 0.0, 0.5, 0.7, 0.9]
    res = correlate(t, ["cos_to_base_at_rl", "delta_fro_total"], ["refusal_rate", "chrf"])
    for col in (
        "pearson_ci_low",
        "pearson_ci_high",
        "spearman_ci_low",
        "spearman_ci_high",
        "n_runs",
        "control",
    ):
        assert col in res.columns
    plain = res[res["control"] == ""]
    allr = plain[(plain["group"] == "all") & (plain["y"] == "refusal_rate")].iloc[0]
    assert allr["n_runs"] == 2 and allr["pearson_ci_low"] <= allr["pearson_ci_high"]
    assert plain.loc[plain["group"] == "full", "n_runs"].eq(1).all()  # one run: no interval
    assert plain.loc[plain["group"] == "full", "pearson_ci_low"].isna().all()
    part = res[(res["control"] == "delta_fro_total") & (res["scope"] == "pooled")]
    assert set(part["x"]) == {"cos_to_base_at_rl"} and set(part["y"]) == {"refusal_rate"}
    assert set(part["group"]) == {"all", "full", "lora"}
    p_all = part[part["group"] == "all"].iloc[0]
    d = t.drop(index=4)  # the shared base once
    expected = _closed_form(d["cos_to_base_at_rl"], d["refusal_rate"], d["delta_fro_total"])
    assert p_all["n"] == 7 and p_all["pearson_r"] == pytest.approx(expected, abs=1e-12)
    assert "2000 bootstrap resamples" in CORRELATIONS_HOW
    # partial rows never displace the plain ones in the report's strongest list
    assert (strongest(res, k=20)["control"] == "").all()


# ------------------------------------------------------------------ scopes: within-run, across runs, every layer


def _two_runs_within():
    """Run a: x 1,2,3 vs y 1,3,2 (r = rho = 0.5 by hand); run b: x 1..4 vs y 4..1 (r = rho = -1); run c has a
    constant y, so no correlation is defined for it and it does not count."""
    rows = []
    for run, xs, ys in (
        ("a", (1.0, 2.0, 3.0), (1.0, 3.0, 2.0)),
        ("b", (1.0, 2.0, 3.0, 4.0), (4.0, 3.0, 2.0, 1.0)),
        ("c", (1.0, 2.0, 3.0), (5.0, 5.0, 5.0)),
    ):
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            rows.append(
                {"run": run, "method": "full" if run != "b" else "lora", "step": 10 * i, "x": x, "y": y}
            )
    return pd.DataFrame(rows)


def test_within_run_mean_of_per_run_correlations_and_its_run_bootstrap():
    t = _two_runs_within()
    every = np.array(
        list(itertools.product(range(2), repeat=2))
    )  # all 4 resamples of the 2 contributing runs
    w = within_run(t["x"], t["y"], t["run"], resamples=every)
    assert w["n_runs"] == 2 and w["n"] == 7  # run c (constant y) is left out
    assert w["pearson_r"] == pytest.approx(-0.25) and w["spearman_rho"] == pytest.approx(-0.25)
    # resample means: (a, a) 0.5, (a, b) and (b, a) -0.25, (b, b) -1; numpy's linear-interpolated percentiles
    lo, hi = np.percentile([0.5, -0.25, -0.25, -1.0], [2.5, 97.5])
    assert lo == pytest.approx(-1 + 0.075 * 0.75) and hi == pytest.approx(-0.25 + 0.925 * 0.75)
    assert w["spearman_ci_low"] == pytest.approx(lo) and w["spearman_ci_high"] == pytest.approx(hi)
    assert w["pearson_ci_low"] == pytest.approx(lo)
    one = within_run(t["x"][:3], t["y"][:3], t["run"][:3])
    assert (
        one["n_runs"] == 1 and one["spearman_rho"] == pytest.approx(0.5) and np.isnan(one["spearman_ci_low"])
    )
    # through correlate: the within_run rows per group; a method group with one defined run has no interval
    res = correlate(t, ["x"], ["y"])
    wr = res[res["scope"] == "within_run"].set_index("group")
    assert wr.loc["within_run:all", "spearman_rho"] == pytest.approx(-0.25)
    assert wr.loc["within_run:full", "n_runs"] == 1 and wr.loc["within_run:full", "spearman_rho"] == 0.5
    assert wr.loc["within_run:lora", "spearman_rho"] == pytest.approx(-1.0)
    assert np.isnan(wr.loc["within_run:full", "spearman_ci_low"]) and wr["spearman_p"].isna().all()


def test_across_runs_uses_each_runs_final_checkpoint():
    rows = []
    for i, (run, fin_x, fin_y) in enumerate(
        (("r1", 0.9, 0.8), ("r2", 0.5, 0.3), ("r3", 0.7, 0.6), ("r4", 0.2, 0.1))
    ):
        rows.append(
            {
                "run": run,
                "checkpoint": "base",
                "method": "full",
                "step": 0,
                "fraction": 0.0,
                "x": 1.0,
                "y": 0.9,
            }
        )
        rows.append(
            {"run": run, "checkpoint": "c1", "method": "full", "step": 5, "fraction": 0.5, "x": 0.0, "y": i}
        )
        if run == "r4":  # a stepless root model of the run: its end
            rows.append(
                {
                    "run": run,
                    "checkpoint": "final",
                    "method": "full",
                    "step": np.nan,
                    "fraction": np.nan,
                    "x": fin_x,
                    "y": fin_y,
                }
            )
        else:
            rows.append(
                {
                    "run": run,
                    "checkpoint": "c2",
                    "method": "full",
                    "step": 10,
                    "fraction": 1.0,
                    "x": fin_x,
                    "y": fin_y,
                }
            )
    t = pd.DataFrame(rows)
    finals = final_checkpoints(t)
    assert finals["run"].tolist() == ["r1", "r2", "r3", "r4"]
    assert finals["checkpoint"].tolist() == ["c2", "c2", "c2", "final"]
    res = correlate(t, ["x"], ["y"])
    across = res[res["group"] == "across_runs:all"].iloc[0]
    expected = pair_stats(np.array([0.9, 0.5, 0.7, 0.2]), np.array([0.8, 0.3, 0.6, 0.1]))
    assert across["n"] == 4 and across["n_runs"] == 4 and across["scope"] == "across_runs"
    assert across["spearman_rho"] == pytest.approx(1.0) and across["pearson_r"] == pytest.approx(
        expected["pearson_r"]
    )
    assert across["spearman_p"] == pytest.approx(
        2 / 24
    )  # exact: the identity and its reverse of 4! orderings
    assert set(res.loc[res["scope"] == "pooled", "group"]) == {"all", "full"}
    assert (strongest(res, k=50)["scope"] == "pooled").all()  # the report's list stays the pooled question


def test_per_layer_correlation_marks_the_chosen_layer_and_has_intervals():
    drift, beh = [], []
    for run, shift in (("r1", 0.0), ("r2", 0.05), ("r3", 0.1)):
        for step, r in {0: 0.9, 10: 0.7, 20: 0.5}.items():
            key = {"run": run, "method": "full", "lr": 1e-4, "step": step, "fraction": step / 20}
            beh.append({**key, "metric": "refusal_rate", "value": r if step else 0.9})
            for layer in (0, 1, 2):
                cos = 1.0 if step == 0 else r + shift + 0.01 * layer
                drift.append({**key, "layer": layer, "module": "", "metric": "cos_to_base", "value": cos})
                drift.append({**key, "layer": layer, "module": "", "metric": "proj_gap", "value": 2 * cos})
    drift, beh = pd.DataFrame(drift), pd.DataFrame(beh)
    pl = per_layer_correlation(drift, beh, refusal_layer=1)
    assert set(pl["scope"]) == {"pooled"} and pl.loc[pl["chosen"], "layer"].tolist() == [1, 1]  # all and full
    assert (pl["n_runs"] == 3).all() and (pl["spearman_ci_low"] <= pl["spearman_ci_high"]).all()
    by_run = per_layer_correlation(drift, beh, refusal_layer={"r1": 2, "r2": 2, "r3": 2}, scopes=SCOPES)
    assert set(by_run["group"]) >= {"all", "within_run:all", "across_runs:all"}
    assert by_run.loc[by_run["chosen"], "layer"].unique().tolist() == [2]
    wide = per_layer_correlations(drift, beh, refusal_layer=1)
    assert set(wide["metric"]) == {"cos_to_base", "proj_gap"} and set(wide["y"]) == {"refusal_rate"}
    pooled = pooled_layers(wide)
    assert pooled.drop(columns="scope").equals(pl.drop(columns="scope"))


def test_committed_cpu_small_groups_have_sane_n():
    """On the committed cpu-small sweep (8 runs of 4 checkpoints, 2 distinct bases): pooled 34 points, a method's
    2 runs 9 points; within-run all 8 runs' 40 rows; across runs one final checkpoint per run."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments/results/cpu-small/analysis/checkpoints.csv"
    table = pd.read_csv(path)
    res = correlate(table, ["cos_to_base_at_rl", "proj_gap_at_rl"], ["refusal_rate"])
    plain = res[res["control"] == ""].set_index(["x", "group"])
    cos = plain.loc["cos_to_base_at_rl"]
    assert cos.loc["all", ["n", "n_runs"]].tolist() == [34, 8]
    for method in ("dpo", "full", "lora", "qlora"):
        assert cos.loc[method, ["n", "n_runs"]].tolist() == [9, 2]
        assert cos.loc[f"within_run:{method}", "n_runs"] == 2
    assert cos.loc["within_run:all", ["n", "n_runs"]].tolist() == [40, 8]
    assert cos.loc["across_runs:all", ["n", "n_runs"]].tolist() == [8, 8]
    assert not any(g.startswith("across_runs:") and g != "across_runs:all" for g in cos.index)  # 2 runs < 3
    ci = res.dropna(
        subset=["spearman_ci_low"]
    )  # NaN where too few points or runs (partial rows of lora, qlora)
    assert len(ci) > 20 and (ci["spearman_ci_low"] <= ci["spearman_ci_high"]).all()
    # refusal falls as the direction turns: positive across runs, with an interval above 0
    assert cos.loc["across_runs:all", "spearman_ci_low"] > 0
