"""LoRA vs full contrast: every metric against hand-computed values on tiny tables, and the committed cpu-small
tables' LoRA-vs-full pair at lr 1e-4 against the numbers the README states."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from refusal_probe.analysis import contrast as C
from refusal_probe.analysis.contrast_plot import plot_lora_vs_full

CPU_SMALL = Path(__file__).resolve().parents[1] / "experiments" / "results" / "cpu-small" / "analysis"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------- math


def test_gini_and_participation_of_even_and_single_mass():
    assert C.gini([1, 1, 1, 1]) == 0.0
    assert C.gini([4, 0, 0, 0]) == pytest.approx(0.75)  # (n - 1) / n
    assert C.participation_ratio([1, 1, 1, 1]) == pytest.approx(4.0)
    assert C.participation_ratio([4, 0, 0, 0]) == pytest.approx(1.0)
    # [4, 4, 0]: ordered |differences| sum to 16, 2 n^2 mean = 48
    assert C.gini([4, 4, 0]) == pytest.approx(1 / 3)
    assert C.participation_ratio([4, 4, 0]) == pytest.approx(2.0)
    assert math.isnan(C.gini([0, 0])) and math.isnan(C.participation_ratio([0, 0]))
    with pytest.raises(ValueError):
        C.gini([1, -1])


def test_top_k_share():
    assert C.top_k_share([1, 4, 2, 3], 2) == pytest.approx(0.7)
    assert C.top_k_share([1, 1], 5) == pytest.approx(1.0)
    assert math.isnan(C.top_k_share([0, 0], 1))


def test_drift_profile_minimum_centre_and_mean():
    p = C.drift_profile([0, 1, 2, 3, 4], [np.nan, 1.0, 0.8, 0.4, 0.8])
    assert p["drift_min_layer"] == 3 and p["drift_min_cos"] == pytest.approx(0.4)
    # weights 1 - cos = 0, 0.2, 0.6, 0.2 on layers 1..4: (0.4 + 1.8 + 0.8) / 1.0
    assert p["drift_centre"] == pytest.approx(3.0)
    assert p["drift_centre_frac"] == pytest.approx(3.0 / 4)
    assert p["drift_mean"] == pytest.approx(0.25)
    still = C.drift_profile([0, 1], [1.0, 1.0])
    assert math.isnan(still["drift_centre"]) and still["drift_mean"] == 0.0


def test_along_fraction_pools_root_sum_square():
    assert C.along_fraction([3, 4], [10, 10]) == pytest.approx(math.sqrt(25 / 200))
    assert math.isnan(C.along_fraction([0], [0]))


def test_module_kind():
    assert [
        C.module_kind(m) for m in ("self_attn.q_proj", "mlp.down_proj", "mlp.gate_proj", "attn.c_proj")
    ] == [
        "q",
        "down",
        "gate",
        "c_proj",
    ]


# ----------------------------------------------------------------------------------------------- tiny tables


def _ckpt(run, method, lr, step, chrf, refusal, cos, **extra):
    name = "base" if step == 0 else f"checkpoint-{step}"
    return {
        "run": run,
        "checkpoint": name,
        "method": method,
        "lr": lr,
        "step": step,
        "fraction": step / 2,
        "refusal_layer": 1.0,
        "cos_to_base_at_rl": cos,
        "refusal_rate": refusal,
        "chrf": chrf,
        **extra,
    }


def tiny_tables(**extra):
    """Two layers, refusal layer 1. full-a and lora-a at lr 1e-4, full-b at 1e-5, qlora-c at 1e-3 (no full partner)."""
    rows = [
        _ckpt("full-a", "full", 1e-4, 0, 20.0, 0.8, 1.0),
        _ckpt("full-a", "full", 1e-4, 1, 30.0, 0.2, 0.7),
        _ckpt("full-a", "full", 1e-4, 2, 40.0, 0.0, 0.5),
        _ckpt("full-b", "full", 1e-5, 0, 20.0, 0.8, 1.0),
        _ckpt("full-b", "full", 1e-5, 2, 26.0, 0.5, 0.9),
        _ckpt("lora-a", "lora", 1e-4, 0, 20.0, 0.8, 1.0),
        _ckpt("lora-a", "lora", 1e-4, 1, 28.0, 0.8, 1.0),
        _ckpt("lora-a", "lora", 1e-4, 2, 39.0, 0.8, 1.0),
        _ckpt("qlora-c", "qlora", 1e-3, 0, 20.0, 0.7, 1.0),
        _ckpt("qlora-c", "qlora", 1e-3, 2, 25.5, 0.6, 1.0),
    ]
    ck = pd.DataFrame(rows)
    for col, vals in extra.items():
        ck[col] = vals
    meta = ck.set_index(["run", "step"])[["checkpoint", "method", "lr", "fraction"]]

    def tag(run, step, rows):
        m = meta.loc[(run, step)]
        return [{"run": run, "step": step, **m.to_dict(), **r} for r in rows]

    drift = pd.DataFrame(
        tag("full-a", 2, [{"layer": 0, "metric": "cos_to_base", "value": 0.9}])
        + tag("full-a", 2, [{"layer": 1, "metric": "cos_to_base", "value": 0.5}])
        + tag("lora-a", 2, [{"layer": lay, "metric": "cos_to_base", "value": 1.0} for lay in (0, 1)])
    )

    def w(layer, module, fro, along=None):
        out = [{"layer": layer, "module": module, "metric": "delta_fro", "value": fro}]
        if along is not None:
            out.append({"layer": layer, "module": module, "metric": "delta_along_refusal", "value": along})
        return out

    full = [
        *w(0, "self_attn.q_proj", 1.0),
        *w(0, "self_attn.o_proj", 2.0, 1.0),
        *w(0, "mlp.down_proj", 2.0, 0.0),
        *w(1, "self_attn.q_proj", 1.0),
        *w(1, "self_attn.o_proj", 1.0, 1.0),
        *w(1, "mlp.down_proj", 1.0, 0.0),
        *w(-1, "embed_tokens", 100.0),
    ]
    lora = [*w(0, "self_attn.q_proj", 2.0), *w(0, "self_attn.o_proj", 2.0, 1.0)]
    deltas = pd.DataFrame(tag("full-a", 2, full) + tag("lora-a", 2, lora))
    ck["delta_fro_total"] = np.where(ck["step"] == 0, 0.0, np.nan)
    ck.loc[(ck["run"] == "full-a") & (ck["step"] == 2), "delta_fro_total"] = math.sqrt(12)
    ck.loc[(ck["run"] == "lora-a") & (ck["step"] == 2), "delta_fro_total"] = math.sqrt(8)
    # sizes only (no per-module rows) for the matched-update pairing
    ck.loc[(ck["run"] == "full-b") & (ck["step"] == 2), "delta_fro_total"] = 1.0
    ck.loc[(ck["run"] == "lora-a") & (ck["step"] == 1), "delta_fro_total"] = 0.5
    ck.loc[(ck["run"] == "qlora-c") & (ck["step"] == 2), "delta_fro_total"] = 1.9
    return ck, drift, deltas


def _row(t, pairing, run, step, role=None):
    sel = t[(t["pairing"] == pairing) & (t["run"] == run) & (t["step"] == step)]
    if role:
        sel = sel[sel["role"] == role]
    assert len(sel) >= 1, (pairing, run, step)
    return sel.iloc[0]


def test_pairings_choose_same_lr_finals_and_nearest_chrf():
    t = C.method_contrast(*tiny_tables(), d_model=4, k=1)
    lr = t[t["pairing"] == "matched_lr"]
    # qlora-c has no full run at lr 1e-3: only lora-a is paired at matched lr, final against final
    assert list(lr["pair"].unique()) == ["lora-a@2 vs full-a@2"]
    assert list(lr["role"]) == ["method", "full"]
    chrf = t[t["pairing"] == "matched_chrf"]
    pairs = dict(
        zip(chrf[chrf["role"] == "method"]["pair"], chrf[chrf["role"] == "method"]["chrf_gap"], strict=True)
    )
    # lora@1 (28): full-a@1 (30) and full-b@2 (26) tie at 2, the same lr wins; lora@2 (39) -> full-a@2 (40);
    # qlora-c@2 (25.5) -> full-b@2 (26) although its lr differs
    assert pairs == {
        "lora-a@1 vs full-a@1": pytest.approx(-2.0),
        "lora-a@2 vs full-a@2": pytest.approx(-1.0),
        "qlora-c@2 vs full-b@2": pytest.approx(-0.5),
    }
    assert set(chrf["pair"]) == set(pairs)


def test_matched_update_pairs_nearest_size_by_ratio():
    t = C.method_contrast(*tiny_tables(), d_model=4)
    upd = t[(t["pairing"] == "matched_update") & (t["role"] == "method")]
    got = dict(zip(upd["pair"], upd["update_ratio"], strict=True))
    # full sizes: full-a@2 sqrt(12) = 3.46, full-b@2 1.0 (full-a@1 has none). qlora-c@2 (1.9) is nearer 3.46 by
    # ratio (1.82x) than 1.0 (1.9x) though nearer 1.0 in difference
    assert got == {
        "lora-a@1 vs full-b@2": pytest.approx(2.0),
        "lora-a@2 vs full-a@2": pytest.approx(math.sqrt(12 / 8)),
        "qlora-c@2 vs full-a@2": pytest.approx(math.sqrt(12) / 1.9),
    }
    lr = t[(t["pairing"] == "matched_lr")]
    assert lr["update_ratio"].tolist() == pytest.approx([math.sqrt(12 / 8)] * 2)


def test_profile_numbers_by_hand():
    t = C.method_contrast(*tiny_tables(), d_model=4, k=1)
    full = _row(t, "matched_lr", "full-a", 2, "full")
    lora = _row(t, "matched_lr", "lora-a", 2, "method")
    # drift: full cos [0.9, 0.5] -> lowest at layer 1; centre (0 * 0.1 + 1 * 0.5) / 0.6; LoRA did not drift
    assert (full["drift_min_layer"], full["drift_min_cos"]) == (1.0, pytest.approx(0.5))
    assert full["drift_centre"] == pytest.approx(0.5 / 0.6)
    assert full["drift_mean"] == pytest.approx(0.3)
    assert math.isnan(lora["drift_centre"]) and lora["drift_mean"] == 0.0
    assert full["refusal_drop"] == pytest.approx(0.8) and lora["refusal_drop"] == pytest.approx(0.0)
    assert full["drift_per_update"] == pytest.approx(0.5 / math.sqrt(12))
    # layer energies: full [1 + 4 + 4, 1 + 1 + 1] = [9, 3] (embedding rows ignored); LoRA [8, 0]
    assert full["top1_layer_share"] == pytest.approx(0.75)
    assert full["layer_gini"] == pytest.approx(12 / 48)
    assert full["layer_pr"] == pytest.approx(144 / 90) and full["layer_pr_frac"] == pytest.approx(0.8)
    assert lora["top1_layer_share"] == 1.0 and lora["layer_gini"] == pytest.approx(0.5)
    assert lora["layer_pr"] == pytest.approx(1.0)
    # module kinds q / o / down: full [2, 5, 5], LoRA [4, 4, 0] (down untouched counts as 0)
    assert (full["share_q"], full["share_o"], full["share_down"]) == pytest.approx((2 / 12, 5 / 12, 5 / 12))
    assert (lora["share_q"], lora["share_o"], lora["share_down"]) == pytest.approx((0.5, 0.5, 0.0))
    assert lora["module_gini"] == pytest.approx(1 / 3) and lora["module_pr"] == pytest.approx(2.0)
    # along: o sqrt((1 + 1) / (4 + 1)), down 0, both sqrt(2 / 10), upstream (layer 0 only) sqrt(1 / 8)
    assert full["along_o"] == pytest.approx(math.sqrt(2 / 5))
    assert full["along_down"] == 0.0
    assert full["along_writers"] == pytest.approx(math.sqrt(0.2))
    assert full["along_upstream"] == pytest.approx(math.sqrt(1 / 8))
    assert full["along_chance"] == pytest.approx(0.5)  # 1 / sqrt(d_model = 4)
    assert full["along_vs_chance"] == pytest.approx(math.sqrt(0.2) / 0.5)
    assert lora["along_o"] == pytest.approx(0.5) and math.isnan(lora["along_down"])
    assert lora["along_vs_chance"] == pytest.approx(1.0)


def test_pair_summary_puts_the_full_partner_beside_and_headline_reads_it():
    t = C.method_contrast(*tiny_tables(), d_model=4, k=1)
    s = C.pair_summary(t)
    assert len(s) == t["pair"].groupby(t["pairing"]).nunique().sum() == 7
    r = s[(s["pairing"] == "matched_lr")].iloc[0]
    assert (r["run"], r["full_run"], r["full_step"]) == ("lora-a", "full-a", 2)
    assert (r["cos_to_base_at_rl"], r["cos_to_base_at_rl_full"]) == (1.0, 0.5)
    assert (r["share_mlp"], r["share_mlp_full"]) == pytest.approx((0.0, 5 / 12))
    assert "necessity_base_at_rl" not in s.columns
    (line,) = C.headline(t)
    assert "lr 0.0001, lora vs full" in line and "refusal 80% vs 0%" in line
    assert "||dW||_F 2.83 vs 3.46 (full 1.2x larger)" in line and "MLP share of the update 0% vs 42%" in line
    assert "along-refusal fraction 1.00x vs 0.89x chance" in line


def test_causal_columns_carried_when_present_and_absent_otherwise():
    ck, drift, deltas = tiny_tables()
    plain = C.method_contrast(ck, drift, deltas, d_model=None)
    assert not any(c.startswith("necessity") for c in plain.columns)
    assert plain["along_chance"].isna().all() and plain["along_vs_chance"].isna().all()
    nec = np.linspace(0.0, 0.9, len(ck))
    t = C.method_contrast(*tiny_tables(necessity_base_at_rl=nec), d_model=4)
    lora = _row(t, "matched_lr", "lora-a", 2, "method")
    assert lora["necessity_base_at_rl"] == pytest.approx(nec[7])


def test_no_full_run_gives_an_empty_table_and_no_figure(tmp_path):
    ck, drift, deltas = tiny_tables()
    keep = ~ck["method"].eq("full")
    t = C.method_contrast(ck[keep], drift, deltas)
    assert t.empty and plot_lora_vs_full(t, drift, deltas, tmp_path) == []


def test_figure_written_with_causal_panel(tmp_path):
    ck, drift, deltas = tiny_tables(necessity_base_at_rl=np.linspace(0.0, 0.9, 10))
    t = C.method_contrast(ck, drift, deltas, d_model=4)
    paths = plot_lora_vs_full(t, drift, deltas, tmp_path)
    assert [p.name for p in paths] == ["lora_vs_full.png", "lora_vs_full.svg"]
    assert paths[0].read_bytes()[:8] == PNG_MAGIC
    assert "necessity_base" in paths[1].read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------- committed tables


def test_committed_cpu_small_lora_vs_full_at_lr_1e_4():
    ck = pd.read_csv(CPU_SMALL / "checkpoints.csv")
    drift = pd.read_csv(CPU_SMALL / "drift.csv")
    deltas = pd.read_csv(CPU_SMALL / "weight_deltas.csv")
    t = C.method_contrast(ck, drift, deltas, d_model=896)  # Qwen2.5-0.5B hidden size
    pair = t[(t["pairing"] == "matched_lr") & (t["pair"] == "lora-lr0.0001@8 vs full-lr0.0001@8")]
    full, lora = (pair[pair["role"] == r].iloc[0] for r in ("full", "method"))
    # README: full lr 1e-4 step 8 cos 0.554, ||dW||_F 3.59; LoRA lr 1e-4 step 8 cos 0.998, 0.33
    assert (full["step"], lora["step"]) == (8, 8)
    assert round(full["cos_to_base_at_rl"], 3) == 0.554 and round(lora["cos_to_base_at_rl"], 3) == 0.998
    assert round(full["delta_fro_total"], 2) == 3.59 and round(lora["delta_fro_total"], 2) == 0.33
    # LoRA's update sits in attention only (no MLP targets); neither method aims its writes at the direction
    assert lora["share_gate"] == lora["share_up"] == lora["share_down"] == 0.0
    assert full["share_gate"] + full["share_up"] + full["share_down"] > 0.8
    assert 0.9 < full["along_vs_chance"] < 1.3 and 0.9 < lora["along_vs_chance"] < 1.3
    assert lora["chrf_gap"] == pytest.approx(28.908367 - 31.640790, abs=1e-5)
    assert lora["update_ratio"] == pytest.approx(3.5931633671981587 / 0.32733604940598177)
    lines = C.headline(t)
    assert len(lines) == 6  # lora, qlora, dpo at each of the two learning rates
    assert any(
        "lr 0.0001, lora vs full" in x and "refusal 78% vs 0%" in x and "(full 11.0x larger)" in x
        for x in lines
    )
