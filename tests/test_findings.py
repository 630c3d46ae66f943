"""The report's findings against hand tables and published interval values."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from refusal_probe.analysis import findings as f
from refusal_probe.analysis import uncertainty as u

Z2 = 1.959963984540054**2


def test_wilson_closed_forms():
    # k = 0: (0, z^2 / (n + z^2)); k = n: (n / (n + z^2), 1)
    lo, hi = u.wilson(0, 32)
    assert (
        lo == 0 and hi == pytest.approx(Z2 / (32 + Z2), abs=1e-12) and hi == pytest.approx(0.107179, abs=1e-6)
    )
    lo, hi = u.wilson(20, 20)
    assert lo == pytest.approx(20 / (20 + Z2), abs=1e-12) and hi == 1
    # 56/70 by hand: centre (0.8 + z^2/140) / (1 + z^2/70) = 0.78439, half-width
    # z * sqrt(0.16/70 + z^2/19600) / (1 + z^2/70) = 0.09255
    assert u.wilson(56, 70) == pytest.approx((0.78439 - 0.09255, 0.78439 + 0.09255), abs=2e-5)
    assert all(math.isnan(v) for v in u.wilson(1, 0))


def test_newcombe_difference_matches_the_paper():
    # Newcombe (1998), Table II, method 10: 56/70 - 48/80 = 0.2000, interval 0.0524 to 0.3339
    lo, hi = u.newcombe_diff(48, 80, 56, 70)
    assert (lo, hi) == pytest.approx((0.0524, 0.3339), abs=5e-5)
    lo2, hi2 = u.newcombe_diff(56, 70, 48, 80)  # the other way round: the same interval, negated
    assert (lo2, hi2) == pytest.approx((-hi, -lo), abs=1e-12)


def test_prompt_count_from_signatures():
    sig = "judge=keywords|n=49|match=word-start|version=1|data=advbench,n=32,suffix=none,greedy"
    assert f.prompt_count(sig) == 32  # the data's n, not the judge's 49 keywords
    assert f.prompt_count("chrF2|nrefs:1") is None and f.prompt_count(None) is None
    beh = pd.DataFrame(
        {
            "metric": ["refusal_rate", "refusal_rate", "refusal_rate", "chrf"],
            "signature": [sig, sig, sig.replace("n=32", "n=16"), "data=ntrex,n=20"],
        }
    )
    assert f.refusal_n(beh) == 32  # the most common
    assert f.refusal_n(None, {"refusal_rate": sig.replace("n=32", "n=8")}) == 8
    assert f.refusal_n(None, None) is None


def _table() -> pd.DataFrame:
    rows = []
    for run, method, rates, chrf, cos, dw in (
        ("full-a", "full", (0.75, 0.25, 0.0), (20.0, 30.0, 35.0), (1.0, 0.7, 0.5), (0.0, 1.0, 3.0)),
        ("lora-a", "lora", (0.75, 0.78125, 0.78125), (20.0, 25.0, 28.0), (1.0, 0.99, 0.98), (0.0, 0.2, 0.3)),
    ):
        for step, r, c, cs, d in zip((0, 4, 8), rates, chrf, cos, dw, strict=True):
            rows.append(
                {
                    "run": run,
                    "checkpoint": "base" if step == 0 else f"checkpoint-{step}",
                    "method": method,
                    "lr": 1e-4,
                    "step": step,
                    "fraction": step / 8,
                    "refusal_rate": r,
                    "chrf": c,
                    "cos_to_base_at_rl": cs,
                    "delta_fro_total": d,
                }
            )
    return pd.DataFrame(rows)


def test_refusal_loss_by_hand():
    t = _table()
    ch = f.run_changes(t, 32).set_index("run")
    # full: 24/32 -> 0/32
    assert ch.loc["full-a", "change"] == -0.75 and ch.loc["full-a", "verdict"] == "lost"
    assert (ch.loc["full-a", "final_lo"], ch.loc["full-a", "final_hi"]) == pytest.approx(u.wilson(0, 32))
    assert (ch.loc["full-a", "change_lo"], ch.loc["full-a", "change_hi"]) == pytest.approx(
        u.newcombe_diff(24, 32, 0, 32)
    )
    # lora: 24/32 -> 25/32, the interval spans 0
    assert ch.loc["lora-a", "change"] == pytest.approx(1 / 32) and ch.loc["lora-a", "verdict"] == "kept"
    finding = f.refusal_loss(t, 32)
    assert finding.available
    lo, hi = u.newcombe_diff(24, 32, 0, 32)
    assert finding.text.startswith("1 of 2 runs lost refusal beyond sampling noise")
    assert "`full-a` (full, lr 0.0001), 75% -> 0% (-75 points" in finding.text
    assert f"95% interval {100 * lo:+.0f} to {100 * hi:+.0f}" in finding.text
    # Wilson at 16/32 by hand: z * sqrt(0.25/32 + z^2/4096) / (1 + z^2/32) = 0.1637
    assert "+/-16 points" in finding.text
    assert finding.items[0].startswith(
        "`full-a` (full, lr 0.0001): refusal 75% [58%, 87%] at the base -> 0% [0%, 11%]"
    )
    assert "chrF 20.0 -> 35.0" in finding.items[0]
    # without n: rates only, said plainly
    assert "not recorded, so no interval" in f.refusal_loss(t, None).text
    absent = f.refusal_loss(t.drop(columns=["refusal_rate"]), 32)
    assert not absent.available and absent.text.startswith("Not available")


def _corr() -> pd.DataFrame:
    cols = [
        "x",
        "y",
        "group",
        "n",
        "pearson_r",
        "spearman_rho",
        "spearman_ci_low",
        "spearman_ci_high",
        "n_runs",
    ]
    rows = [
        ("cos_to_base_at_rl", "refusal_rate", "all", 34, 0.86, 0.84, 0.61, 0.95, 8, ""),
        ("proj_gap_at_rl", "refusal_rate", "all", 34, 0.92, 0.93, 0.80, 0.98, 8, ""),
        ("proj_gap_at_rl", "refusal_rate", "full", 9, 0.99, 0.99, 0.9, 1.0, 2, ""),  # not the pooled group
        (
            "delta_fro_total",
            "refusal_rate",
            "all",
            34,
            -0.7,
            -0.96,
            -0.99,
            -0.5,
            8,
            "",
        ),  # update size: excluded
        ("proj_gap_at_rl", "chrf", "all", 34, 0.1, -0.97, -1.0, 0.2, 8, ""),  # other y
        ("proj_gap_at_rl", "refusal_rate", "all", 34, 0.5, 0.55, -0.05, 0.81, 8, "delta_fro_total"),
        ("proj_gap_at_rl", "refusal_rate", "across_runs:all", 8, 0.9, 0.88, 0.5, 0.99, 8, ""),
    ]
    return pd.DataFrame([r[:-1] + (r[-1],) for r in rows], columns=[*cols, "control"])


def test_strongest_correlate_by_hand():
    finding = f.strongest_correlate(_corr())
    assert finding.text == (
        "`proj_gap_at_rl` tracks refusal_rate most closely over all checkpoints: Spearman rho = 0.93 "
        "(95% interval [0.80, 0.98] from resampling 8 runs), Pearson r = 0.92, n = 34 checkpoints."
    )
    assert finding.items == (
        "with `delta_fro_total` (update size) partialled out: Spearman rho = 0.55 (95% interval [-0.05, 0.81] "
        "from resampling 8 runs)",
        "across runs (final checkpoints, one point per run): Spearman rho = 0.88 (95% interval [0.50, 0.99] from "
        "resampling 8 runs), n = 8 checkpoints",
        "update size alone (`delta_fro_total`): Spearman rho = -0.96 (95% interval [-0.99, -0.50] from "
        "resampling 8 runs)",
    )
    # an interval through 0 is said; an old table without intervals says it has none
    c = _corr().assign(spearman_ci_low=-0.1)
    assert "includes 0" in f.strongest_correlate(c).text
    old = _corr().drop(columns=["spearman_ci_low", "spearman_ci_high", "n_runs", "control"])
    assert "(no interval in this table)" in f.strongest_correlate(old).text
    assert not f.strongest_correlate(None).available
    # two runs: a run bootstrap has 3 distinct resamples, so no interval is claimed (and no "includes 0")
    two = f.strongest_correlate(_corr().assign(n_runs=2, spearman_ci_low=-0.1))
    assert "Spearman rho = 0.93 (no interval: 2 runs are too few to resample; 3 needed)" in two.text
    assert "includes 0" not in two.text and "[" not in "".join(two.items)


def test_lora_vs_full_by_hand():
    finding = f.lora_vs_full(_table(), None, 32)
    assert finding.available and finding.text.startswith("At 1 matched learning rate(s)")
    assert "`method_contrast.csv` is not present" in finding.text
    (item,) = finding.items
    assert item == (
        "lr 0.0001, at the last checkpoint: full (refusal 0% [0%, 11%], cosine to the base direction 0.5, "
        "||dW||_F 3, chrF 35.0); lora (refusal 78% [61%, 89%], cosine to the base direction 0.98, ||dW||_F 0.3, "
        "chrF 28.0)"
    )
    contrast = pd.DataFrame({"pairing": ["matched_lr"], "run": ["lora-a"]})
    assert "(`method_contrast.csv`, 1 rows)" in f.lora_vs_full(_table(), contrast, 32).text
    # with analyze's contrast table, its matched-lr headline joins the finding
    from refusal_probe.analysis.contrast import method_contrast

    real = method_contrast(_table(), None, None)
    found = f.lora_vs_full(_table(), real, 32)
    assert found.items[1].startswith(
        "method_contrast.csv, lr 0.0001, lora vs full (final checkpoints): refusal 78% vs 0%"
    )
    only_full = _table()[_table()["method"] == "full"]
    assert not f.lora_vs_full(only_full, None, 32).available


def test_prediction_by_hand():
    pred = {
        "primary": "proj_gap",
        "baseline": "baseline",
        "goals": {"mae_at_most": 0.05, "auroc_at_least": 0.9},
        "models": {
            "proj_gap": {
                "features": ["proj_gap_at_rl"],
                "LORO": {
                    "n": 32,
                    "mae": 0.04,
                    "spearman": 0.92,
                    "coverage": 0.9,
                    "worst": {"held_out": "x", "mae": 0.1},
                },
                "LOMO": {"n": 32, "mae": 0.13, "spearman": 0.85},
            },
            "baseline": {"LORO": {"mae": 0.2, "spearman": 0.5}, "LOMO": {"mae": 0.25, "spearman": 0.4}},
        },
        "auroc": {"refusal_score": {"pooled": 0.93, "n_prompts": 1024, "median_per_checkpoint": 0.9}},
        "fails": "proj_gap: LOMO misses.",
    }
    finding = f.prediction(pred)
    assert (
        finding.text.startswith("Predictor `proj_gap` (proj_gap_at_rl)")
        and "Where it fails: proj_gap" in finding.text
    )
    assert finding.items[0] == (
        "LORO: MAE 0.04, Spearman 0.92, interval coverage 90% over 32 held-out checkpoints (weight-size baseline: "
        "MAE 0.2, Spearman 0.5); worst held out `x` at MAE 0.1 (goal <= 0.05: met)"
    )
    assert finding.items[1].endswith("(goal <= 0.05: not met)")
    assert "AUROC of the refusal score for the prompt's own verdict 0.93 pooled over 1024" in finding.items[2]
    assert finding.items[2].endswith("(goal >= 0.9: met)")
    generic = f.prediction({"loro": {"mae": 0.07}})
    assert generic.items == ("loro.mae = 0.07 (target <= 0.05: not met)",)
    assert not f.prediction(None).available and not f.prediction({"x": "y"}).available


def test_causal_by_hand():
    t = _table().assign(necessity_base_at_rl=[4.0, 2.0, 0.5, 4.0, 3.9, 3.8])
    finding = f.causal(t)
    assert finding.items == (
        "`full-a` (full, lr 0.0001) at step 8: necessity_base 0.5 (base 4)",
        "`lora-a` (lora, lr 0.0001) at step 8: necessity_base 3.8 (base 4)",
    )
    assert not f.causal(_table()).available


def test_all_findings_in_order_and_absent_inputs_say_so():
    out = f.all_findings(None, None, n=None)
    assert [x.key for x in out] == ["refusal_loss", "correlate", "contrast", "prediction", "causal"]
    assert all(not x.available and x.text.startswith("Not available") for x in out)
