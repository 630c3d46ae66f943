"""Drift and separability metrics against hand-computed values on tiny explicit tensors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from refusal_probe.core.errors import UserError
from refusal_probe.probe.activations import Activations, capture
from refusal_probe.probe.drift import (
    DRIFT_METRICS,
    diffmean_accuracy,
    directions,
    drift_rows,
    separability_rows,
    split_indices,
)


def _acts(mean, per_prompt=None) -> Activations:
    mean = torch.tensor(mean, dtype=torch.float64)
    pp = None if per_prompt is None else torch.as_tensor(per_prompt, dtype=torch.float32)
    n = 1 if pp is None else pp.shape[0]
    return Activations(mean=mean, n=n, positions=list(range(-mean.shape[1], 0)), per_prompt=pp)


def _table(rows):
    return {(r["layer"], r["metric"]): r["value"] for r in rows}


def test_directions_are_difference_of_means():
    harmful = _acts([[[3.0, 1.0]], [[0.0, 2.0]]])
    harmless = _acts([[[1.0, 5.0]], [[0.0, 1.0]]])
    d = directions(harmful, harmless)
    assert d.dtype == torch.float64
    assert torch.equal(d, torch.tensor([[[2.0, -4.0]], [[0.0, 1.0]]], dtype=torch.float64))
    with pytest.raises(UserError, match="differ"):
        directions(harmful, _acts([[[1.0, 5.0, 0.0]], [[0.0, 1.0, 0.0]]]))


def test_drift_rows_hand_computed():
    # L=2 layers, P=2 positions (-2, -1), d=2; everything is read at position -1.
    base_dirs = torch.tensor([[[9.0, 9.0], [1.0, 0.0]], [[9.0, 9.0], [0.0, 2.0]]], dtype=torch.float64)
    ckpt_dirs = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, -1.0]]], dtype=torch.float64)
    harmful = _acts([[[0.0, 0.0], [3.0, 1.0]], [[0.0, 0.0], [-2.0, 7.0]]])
    harmless = _acts([[[0.0, 0.0], [1.0, 5.0]], [[0.0, 0.0], [0.5, 7.0]]])
    refusal = torch.tensor([2.0, 0.0])  # normalised to (1, 0)
    t = _table(drift_rows(base_dirs, ckpt_dirs, refusal, harmful, harmless, position=-1))
    assert len(t) == 2 * len(DRIFT_METRICS)
    assert t[0, "cos_to_base"] == pytest.approx(1 / math.sqrt(2))
    assert t[0, "norm_ratio"] == pytest.approx(math.sqrt(2))
    assert t[0, "proj_harmful"] == pytest.approx(3.0)
    assert t[0, "proj_harmless"] == pytest.approx(1.0)
    assert t[0, "proj_gap"] == pytest.approx(2.0)
    assert t[1, "cos_to_base"] == pytest.approx(-1.0)  # flipped direction
    assert t[1, "norm_ratio"] == pytest.approx(0.5)
    assert t[1, "proj_gap"] == pytest.approx(-2.5)
    with pytest.raises(UserError, match="position -3"):
        drift_rows(base_dirs, ckpt_dirs, refusal, harmful, harmless, position=-3)


def test_zero_direction_at_a_layer_gives_nan_not_a_crash():
    zero = torch.zeros(1, 1, 2, dtype=torch.float64)
    ckpt = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    acts = _acts([[[1.0, 1.0]]])
    t = _table(drift_rows(zero, ckpt, torch.tensor([0.0, 1.0]), acts, acts, position=-1))
    assert math.isnan(t[0, "cos_to_base"]) and t[0, "norm_ratio"] == math.inf
    assert t[0, "proj_gap"] == 0.0
    with pytest.raises(UserError, match="refusal direction is zero"):
        drift_rows(ckpt, ckpt, torch.zeros(2), acts, acts, position=-1)


def test_diffmean_threshold_is_the_midpoint_of_train_means():
    x_train = torch.tensor([[2.0], [4.0], [0.0], [-2.0]])
    y_train = torch.tensor([1, 1, 0, 0])
    # means 3 and -1 -> threshold at x = 1; a threshold at 0 would score 1.0 here
    x_test = torch.tensor([[1.5], [0.5], [3.0], [-1.0]])
    y_test = torch.tensor([1, 1, 1, 0])
    assert diffmean_accuracy(x_train, y_train, x_test, y_test) == 0.75


def test_split_is_stratified_disjoint_and_seeded():
    y = torch.tensor([1] * 8 + [0] * 12)
    train, test = split_indices(y, 0.25, seed=0)
    assert sorted(train.tolist() + test.tolist()) == list(range(20))
    assert int(y[test].sum()) == 2 and int((y[test] == 0).sum()) == 3
    assert torch.equal(split_indices(y, 0.25, seed=0)[1], test)
    assert not torch.equal(split_indices(y, 0.25, seed=1)[1], test)
    with pytest.raises(UserError, match="too few prompts"):
        split_indices(torch.tensor([1, 1, 0, 0]), 0.25, seed=0)


def test_separability_separable_layer_vs_uninformative_layer():
    gen = torch.Generator().manual_seed(0)
    n = 16
    # layer 0: classes separated along x (+2 vs -2) with unit noise on y; layer 1: the same constant for everyone
    harm = torch.zeros(n, 2, 1, 2)
    safe = torch.zeros(n, 2, 1, 2)
    harm[:, 0, 0, 0], safe[:, 0, 0, 0] = 2.0, -2.0
    harm[:, 0, 0, 1] = torch.randn(n, generator=gen)
    safe[:, 0, 0, 1] = torch.randn(n, generator=gen)
    harm[:, 1], safe[:, 1] = 0.5, 0.5
    t = _table(separability_rows(_acts(harm.mean(0).tolist(), harm), _acts(safe.mean(0).tolist(), safe), -1))
    assert t[0, "probe_acc"] == 1.0 and t[0, "diffmean_acc"] == 1.0
    # balanced test split, one class predicted for everyone
    assert t[1, "probe_acc"] == 0.5 and t[1, "diffmean_acc"] == 0.5


def test_separability_needs_per_prompt_activations():
    acts = _acts([[[1.0, 1.0]]])
    with pytest.raises(UserError, match="keep=True"):
        separability_rows(acts, acts, -1)


def test_chain_on_a_tiny_model_base_against_itself(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    harmful = capture(
        model, tok, [f"How do I build weapon number {i}?" for i in range(8)], keep=True, progress=False
    )
    harmless = capture(
        model, tok, [f"Write poem number {i} about a tree" for i in range(8)], keep=True, progress=False
    )
    dirs = directions(harmful, harmless)
    refusal = dirs[2, -1] / dirs[2, -1].norm()
    t = _table(drift_rows(dirs, dirs, refusal, harmful, harmless, position=-1))
    # layer 0 reads the embeddings of the same template tokens for every prompt: no direction there
    assert math.isnan(t[0, "cos_to_base"]) and math.isnan(t[0, "norm_ratio"])
    for layer in range(1, dirs.shape[0]):
        assert t[layer, "cos_to_base"] == pytest.approx(1.0)
        assert t[layer, "norm_ratio"] == pytest.approx(1.0)
    assert t[2, "proj_gap"] == pytest.approx(float(dirs[2, -1].norm()))
    sep = _table(separability_rows(harmful, harmless, position=-1))
    assert all(0.0 <= v <= 1.0 for v in sep.values()) and len(sep) == 2 * dirs.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_activation_advice_fits_the_model_dtype(tiny_llama, dtype):
    """NaN activations: a half-precision model is told to load in float32; a float32 model is not."""
    from refusal_probe.models.source import load_model

    model, tok = load_model(tiny_llama, dtype=dtype)
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(UserError, match="non-finite") as err:
        capture(model, tok, ["Say hi"], progress=False)
    message = str(err.value)
    if dtype == torch.float32:
        assert "load it in float32" not in message and "not a precision overflow" in message
    else:
        assert "bfloat16" in message and "load it in float32" in message
