"""Causal drift (probe/causal.py, analysis/readings.py): the arithmetic by hand, a tiny model whose answer is known
(the direction removed from its weights: ablating it must change nothing), and analyze's tables on a tiny tree."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from refusal_probe.analysis.readings import reading, with_readings
from refusal_probe.core.errors import UserError
from refusal_probe.probe.causal import (
    CAUSAL_METRICS,
    INTERVALS,
    causal_rows,
    causal_scores,
    check_layers_spec,
    derived,
    mean_scores,
    paired_interval,
    resolve_layers,
)
from refusal_probe.probe.noise import resample_counts

# ----------------------------------------------------------------------------------------------- pure arithmetic


def test_derived_by_hand():
    got = derived(
        {
            "score_harmful": 2.5,
            "score_harmful_ablate_base": -1.0,
            "score_harmful_ablate_own": 0.5,
            "score_harmless": -3.0,
            "score_harmless_add_base": 1.25,
        }
    )
    assert got == {"necessity_base": 3.5, "necessity_own": 2.0, "sufficiency_base": 4.25}


def test_mean_scores_by_hand_and_missing_is_nan():
    got = mean_scores(
        {
            "score_harmful": torch.tensor([1.0, 3.0]),  # mean 2
            "score_harmful_ablate_base": torch.tensor([0.0, -1.0]),  # mean -0.5
            "score_harmful_ablate_own": None,  # not computable (zero direction)
            "score_harmless": torch.tensor([-2.0, -4.0, -6.0]),  # mean -4
            "score_harmless_add_base": torch.tensor([0.0, 1.0, 2.0]),  # mean 1
        }
    )
    assert got["necessity_base"] == pytest.approx(2.5)
    assert got["sufficiency_base"] == pytest.approx(5.0)
    assert math.isnan(got["score_harmful_ablate_own"]) and math.isnan(got["necessity_own"])


def test_rows_are_tidy_and_ordered():
    values = {m: float(i) for i, m in enumerate(CAUSAL_METRICS)}
    rows = causal_rows({3: values, 1: values})
    assert [r["layer"] for r in rows] == [1] * len(CAUSAL_METRICS) + [3] * len(CAUSAL_METRICS)
    assert [r["metric"] for r in rows[: len(CAUSAL_METRICS)]] == list(CAUSAL_METRICS)
    assert rows[1] == {"layer": 1, "metric": CAUSAL_METRICS[1], "value": 1.0}


def test_layer_spec():
    assert check_layers_spec("refusal") == "refusal" and check_layers_spec(" ALL ") == "all"
    assert check_layers_spec("4, 8,012") == "4,8,12"
    assert resolve_layers("refusal", 6, 2) == [2]
    assert resolve_layers("all", 3, 1) == [0, 1, 2]
    assert resolve_layers("4,0", 6, 2) == [0, 2, 4]  # the refusal layer always
    for bad in ("", "some", "1,,2", "-1", "1.5"):
        with pytest.raises(UserError, match="--causal-layers"):
            check_layers_spec(bad)
    with pytest.raises(UserError, match="--causal-layers 9: layer 9 is out of range"):
        resolve_layers("9", 6, 2)


def test_reading_labels_by_hand():
    # cos, gap ratio, necessity_base ratio, necessity_own ratio, sufficiency ratio
    assert reading(0.99, 1.0, 0.9, 0.9, 0.9) == "kept"
    assert reading(0.5, 0.2, 0.1, 0.8, 0.1) == "rotated"
    assert reading(0.5, 0.2, 0.1, 0.3, 0.1) == "mixed"
    assert reading(0.95, 0.5, 0.4, 0.4, 0.4) == "shrank"
    assert reading(0.95, 0.9, 0.3, 0.3, 1.0) == "stopped reading"
    assert reading(0.95, 0.9, 1.0, 1.0, 0.6) == "stopped reading"
    assert reading(math.nan, 1.0, 1.0, 1.0, 1.0) == ""


def _row(run, step, cos, gap, nec_base, nec_own, suff) -> dict:
    return dict(
        run=run,
        step=step,
        cos_to_base_at_rl=cos,
        proj_gap_at_rl=gap,
        necessity_base_at_rl=nec_base,
        necessity_own_at_rl=nec_own,
        sufficiency_base_at_rl=suff,
    )


def test_readings_against_each_runs_base():
    table = pd.DataFrame(
        [
            _row("a", 0, 1.0, 4.0, 2.0, 2.0, 3.0),
            _row("a", 5, 0.97, 1.0, 1.9, 1.9, 3.0),  # gap 1/4 of the base's, direction kept: shrank
            _row(
                "a", 9, 0.5, 1.0, 0.2, 1.8, 0.5
            ),  # moved, own direction 1.8 / 2 = 0.9 of the base's: rotated
            _row("b", 0, 1.0, 4.0, 0.5, 0.5, 3.0),  # run b's base does not use its direction (0.5 < 1)
            _row("b", 5, 0.2, 0.1, 0.0, 0.0, 0.0),  # so nothing to lose: no reading
        ]
    )
    assert with_readings(table)["causal_reading"].tolist() == ["", "shrank", "rotated", "", ""]
    assert "causal_reading" not in with_readings(table.drop(columns=["necessity_own_at_rl"]))


# ----------------------------------------------------------------------------------------------- a known answer


def _prompts():
    from refusal_probe import data

    return data.harmful_val()[:6], data.harmless_val()[:6]


def _orthogonalised(model, r: torch.Tensor):
    """A copy of ``model`` that can never write along unit ``r``: embeddings, o_proj and down_proj projected."""
    out = copy.deepcopy(model)
    r = r.to(torch.float32)
    with torch.no_grad():
        emb = out.model.embed_tokens.weight  # [vocab, d]: rows are residual vectors
        emb -= (emb @ r)[:, None] * r[None, :]
        for layer in out.model.layers:
            for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):  # [d, in]
                w -= r[:, None] * (r[None, :] @ w)
    return out


def test_direction_removed_from_the_weights_leaves_nothing_to_ablate(tiny_llama):
    from refusal_probe.models.source import load_model
    from refusal_probe.probe.activations import capture
    from refusal_probe.probe.drift import directions
    from refusal_probe.probe.refusal_tokens import refusal_token_ids

    model, tok = load_model(tiny_llama)
    harmful, harmless = _prompts()
    ids = refusal_token_ids(tok)
    acts = [capture(model, tok, p, batch_size=6, progress=False) for p in (harmful, harmless)]
    r = directions(*acts)[2, -1]  # diff of means at layer 2, last position
    unit = r / r.norm()
    base = {2: r}

    original = causal_scores(model, tok, harmful, harmless, base, None, ids, batch_size=3)
    assert original.forwards == 2 + 2  # the base against itself: own = base, not run twice
    before = original.means()[2]
    assert before["score_harmful_ablate_own"] == before["score_harmful_ablate_base"]
    assert abs(before["necessity_base"]) > 1e-3

    cleaned = _orthogonalised(model, unit)
    own = {2: unit * 5.0}  # a direction that is not the base one: ablated on its own
    got = causal_scores(cleaned, tok, harmful, harmless, base, own, ids, batch_size=3)
    assert got.forwards == 2 + 3
    after = got.means()[2]
    per_prompt = got.per_prompt[2]
    # nothing along r is ever written, so projecting r out changes no score (float32 rounding only)
    assert abs(after["necessity_base"]) < 1e-6 < 1e-3 < abs(before["necessity_base"])
    assert torch.allclose(per_prompt["score_harmful"], per_prompt["score_harmful_ablate_base"], atol=1e-5)
    assert abs(after["necessity_own"]) < 1e-6  # the same line, scaled: the same answer
    # weight orthogonalisation is ablation (Arditi et al.): the cleaned model scores as the ablated original
    assert after["score_harmful"] == pytest.approx(before["score_harmful_ablate_base"], abs=1e-5)
    # the model still reads r where it is put: adding it still moves the harmless score
    assert abs(after["sufficiency_base"]) > 1e-3


def test_a_zero_direction_costs_nothing_and_is_nan(tiny_llama):
    from refusal_probe.models.source import load_model
    from refusal_probe.probe.refusal_tokens import refusal_token_ids

    model, tok = load_model(tiny_llama)
    harmful, harmless = _prompts()
    d = model.config.hidden_size
    got = causal_scores(model, tok, harmful, harmless, {0: torch.zeros(d)}, None, refusal_token_ids(tok), 6)
    assert got.forwards == 2
    row = got.means(n_boot=20)[0]
    assert math.isfinite(row["score_harmful"]) and math.isfinite(row["score_harmless"])
    assert all(math.isnan(row[m]) for m in CAUSAL_METRICS if m not in ("score_harmful", "score_harmless"))


# ----------------------------------------------------------------------------------------------- analyze


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, tiny_llama):
    from refusal_probe.cli import main
    from refusal_probe.testing.tiny import noisy_full_run

    root = tmp_path_factory.mktemp("causal") / "ckpt"
    noisy_full_run(tiny_llama, root / "full-lr1e-04", steps=(2,), scale=0.02, seed=3)
    args = ["--n-prompts", "8", "--n-val", "4", "--batch-size", "4", "--no-progress", "--no-separability"]
    assert main(["analyze", str(root), *args, "--no-deltas", "--causal-layers", "all"]) == 0
    return root / "analysis"


def test_analyze_writes_causal_columns_rows_and_figure(analysed):
    table = pd.read_csv(analysed / "checkpoints.csv")
    cols = [f"{m}_at_rl" for m in CAUSAL_METRICS]
    assert set(cols) <= set(table.columns) and "causal_reading" in table.columns
    assert len(table) == 2 and table[cols].notna().all().all()
    base = table[table["step"] == 0].iloc[0]
    assert base["necessity_own_at_rl"] == base["necessity_base_at_rl"]  # the base against itself
    for m in (
        "necessity_base",
        "necessity_own",
        "sufficiency_base",
    ):  # each interval holds its point estimate
        assert (table[f"{m}_ci_low_at_rl"] <= table[f"{m}_at_rl"] + 1e-12).all()
        assert (table[f"{m}_at_rl"] <= table[f"{m}_ci_high_at_rl"] + 1e-12).all()

    drift = pd.read_csv(analysed / "drift.csv")
    causal = drift[drift["metric"].isin(CAUSAL_METRICS)]
    n_layers = drift[drift["metric"] == "cos_to_base"]["layer"].nunique()
    assert sorted(causal["layer"].unique()) == list(range(n_layers))  # --causal-layers all
    assert len(causal) == 2 * n_layers * len(CAUSAL_METRICS)  # base and checkpoint
    later = causal[causal["layer"] > 0]  # layer 0's direction is zero (same template tokens): NaN there
    assert later["value"].notna().all()
    assert {"causal_drift.png", "causal_drift.svg", "drift_necessity_base_by_layer.png"} <= {
        p.name for p in analysed.iterdir()
    }


def test_paired_interval_by_hand():
    # a constant difference has no spread: every resample's mean is 0.5
    counts = resample_counts(np.random.default_rng(0), 50, 3)
    assert paired_interval(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.5, 2.5]), counts) == (0.5, 0.5)
    # two pairs with differences 0 and 1, resamples enumerated: copies (2,0) mean 0, (1,1) mean 0.5, (0,2) mean 1
    counts = np.array([[2, 0]] * 10 + [[1, 1]] * 80 + [[0, 2]] * 10)
    lo, hi = paired_interval(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0]), counts)
    assert (lo, hi) == (pytest.approx(0.0), pytest.approx(1.0))
    counts = np.array([[1, 1]] * 100)  # no resample moves: the interval is the point
    assert paired_interval(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0]), counts) == (0.5, 0.5)
    with pytest.raises(ValueError, match="do not fit 2 prompt pairs"):
        paired_interval(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), np.ones((5, 3)))


def test_mean_scores_intervals_pair_the_prompts():
    # harmful scores vary a lot across prompts but ablation lowers each by exactly 2: paired interval [2, 2]
    harmful = torch.tensor([5.0, -3.0, 1.0, 9.0])
    got = mean_scores(
        {
            "score_harmful": harmful,
            "score_harmful_ablate_base": harmful - 2,
            "score_harmful_ablate_own": None,
            "score_harmless": torch.tensor([0.0, 1.0, 2.0, 3.0]),
            "score_harmless_add_base": torch.tensor([1.0, 1.0, 1.0, 1.0]),
        },
        {4: resample_counts(np.random.default_rng(1), 200, 4)},
    )
    assert got["necessity_base_ci_low"] == pytest.approx(2.0) and got[
        "necessity_base_ci_high"
    ] == pytest.approx(2.0)
    assert math.isnan(got["necessity_own_ci_low"]) and math.isnan(got["necessity_own_ci_high"])
    # sufficiency: differences 1, 0, -1, -2 (mean -0.5): the interval holds the mean and lies within [-2, 1]
    lo, hi = got["sufficiency_base_ci_low"], got["sufficiency_base_ci_high"]
    assert -2.0 <= lo < -0.5 < hi <= 1.0
    assert set(INTERVALS) <= set(got)
