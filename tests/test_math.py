"""The pure probe math, against values worked out by hand and against the dense computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from refusal_probe.probe.measures import (
    cosine,
    dense_delta_along,
    difference_frobenius,
    frobenius_norm,
    lora_delta_along,
    lora_delta_frobenius,
    mean_difference,
    norm_ratio,
    project,
    unit,
)

T = torch.tensor


def test_mean_difference_is_float64_difference():
    d = mean_difference(T([3.0, 1.0]), T([1.0, 1.5]))
    assert d.dtype == torch.float64
    assert d.tolist() == [2.0, -0.5]
    with pytest.raises(ValueError):
        mean_difference(T([1.0, 2.0]), T([1.0, 2.0, 3.0]))


def test_unit_hand_values_batched_and_zero():
    assert unit(T([3.0, 4.0])).tolist() == pytest.approx([0.6, 0.8])
    u = unit(T([[3.0, 4.0], [0.0, -2.0]]))
    assert u.dtype == torch.float64
    assert u.tolist() == [pytest.approx([0.6, 0.8]), pytest.approx([0.0, -1.0])]
    assert unit(T([[3.0, 0.0], [4.0, 0.0]]), dim=0)[:, 0].tolist() == pytest.approx([0.6, 0.8])
    assert torch.isnan(unit(T([0.0, 0.0]))).all()


def test_cosine_hand_values_batched_and_zero():
    assert float(cosine(T([1.0, 0.0]), T([1.0, 1.0]))) == pytest.approx(1 / math.sqrt(2))
    assert float(cosine(T([1.0, 2.0]), T([-2.0, -4.0]))) == pytest.approx(-1.0)
    # leading dims broadcast: [3, 2] against [2]
    c = cosine(T([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), T([1.0, 0.0]))
    assert c.dtype == torch.float64 and c.tolist() == pytest.approx([1.0, 0.0, -1.0])
    z = cosine(T([[0.0, 0.0], [1.0, 1.0]]), T([[1.0, 0.0], [1.0, 0.0]]))
    assert math.isnan(z[0]) and float(z[1]) == pytest.approx(1 / math.sqrt(2))


def test_cosine_matches_dense_on_random():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, 32, generator=g), torch.randn(4, 5, 32, generator=g)
    want = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    assert torch.allclose(cosine(a, b), want, atol=1e-12)


def test_norm_ratio_and_project_hand_values():
    assert float(norm_ratio(T([3.0, 4.0]), T([0.0, 2.0]))) == pytest.approx(2.5)
    assert norm_ratio(T([[3.0, 4.0], [1.0, 0.0]]), T([[0.0, 1.0], [0.0, 4.0]])).tolist() == pytest.approx(
        [5.0, 0.25]
    )
    # rows [3,4] and [1,0] projected on direction [0,2] (unit [0,1]) -> 4 and 0; on [3,4] (unit [.6,.8]) -> 5, 0.6
    x = T([[3.0, 4.0], [1.0, 0.0]])
    assert project(x, T([0.0, 2.0])).tolist() == pytest.approx([4.0, 0.0])
    assert project(x, T([3.0, 4.0])).tolist() == pytest.approx([5.0, 0.6])
    assert project(x, T([0.0, 2.0])).dtype == torch.float64


def test_frobenius_hand_value_and_float64_accumulation(monkeypatch):
    assert frobenius_norm(T([[1.0, 2.0], [2.0, 4.0]])) == 5.0
    assert difference_frobenius(T([[1.0, 2.0], [2.0, 4.0]]), T([[1.0, 0.0], [2.0, 4.0]])) == 2.0
    w = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(1)) * 0.02
    want = float(np.sqrt(np.sum(w.numpy().astype(np.float64) ** 2)))
    assert frobenius_norm(w) == pytest.approx(want, rel=1e-12)
    # chunked reduction gives the same value as one pass
    monkeypatch.setattr("refusal_probe.probe.measures.CHUNK_ELEMENTS", 4096)
    assert frobenius_norm(w) == pytest.approx(want, rel=1e-12)
    v = w + 1e-3
    want_d = float(np.sqrt(np.sum((v.numpy().astype(np.float64) - w.numpy().astype(np.float64)) ** 2)))
    assert difference_frobenius(v, w) == pytest.approx(want_d, rel=1e-12)


def test_lora_norms_hand_values():
    # r=1: A=[[1,2]], B=[[1],[3]] -> B@A = [[1,2],[3,6]], ||.||_F^2 = 50; scale 2 -> 2*sqrt(50)
    A, B = T([[1.0, 2.0]]), T([[1.0], [3.0]])
    assert lora_delta_frobenius(A, B, 2.0) == pytest.approx(2 * math.sqrt(50))
    # along e1: [1,2] -> sqrt(5); along [.6,.8]: .6*[1,2] + .8*[3,6] = [3,6] -> sqrt(45); times scale 2
    assert lora_delta_along(A, B, 2.0, T([1.0, 0.0])) == pytest.approx(2 * math.sqrt(5))
    assert lora_delta_along(A, B, 2.0, T([0.6, 0.8])) == pytest.approx(2 * math.sqrt(45))
    # r=2: A=diag(1,2), B=[[1,1],[0,1]] -> B@A = [[1,2],[0,2]], ||.||_F = 3; |scale| used
    A2, B2 = T([[1.0, 0.0], [0.0, 2.0]]), T([[1.0, 1.0], [0.0, 1.0]])
    assert lora_delta_frobenius(A2, B2, -0.5) == pytest.approx(1.5)
    assert lora_delta_along(A2, B2, -0.5, T([0.0, 1.0])) == pytest.approx(0.5 * 2.0)
    with pytest.raises(ValueError):
        lora_delta_frobenius(T([[1.0, 2.0]]), T([[1.0, 2.0]]), 1.0)


def test_dense_delta_along_hand_values_and_conv1d_axis():
    delta = T([[1.0, 2.0], [3.0, 6.0]])
    assert dense_delta_along(delta, T([0.6, 0.8])) == pytest.approx(math.sqrt(45))
    assert dense_delta_along(delta, T([1.0, 0.0])) == pytest.approx(math.sqrt(5))
    # GPT-2 Conv1D stores [d_in, d_model]: the same update transposed gives the same number
    assert dense_delta_along(delta.T, T([0.6, 0.8]), out_axis=1) == pytest.approx(math.sqrt(45))
    with pytest.raises(ValueError):
        dense_delta_along(torch.zeros(3, 2), T([1.0, 0.0]))


def test_lora_factor_norms_match_dense_product_on_random():
    g = torch.Generator().manual_seed(2)
    for r, d_out, d_in in [(1, 7, 5), (4, 64, 128), (8, 96, 48)]:
        A, B = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
        scale = 16 / r
        dense = scale * (B.double() @ A.double())
        r_hat = unit(torch.randn(d_out, generator=g))
        assert lora_delta_frobenius(A, B, scale) == pytest.approx(float(dense.norm()), rel=1e-10)
        assert lora_delta_along(A, B, scale, r_hat) == pytest.approx(float((r_hat @ dense).norm()), rel=1e-10)
        assert dense_delta_along(dense, r_hat) == pytest.approx(float((r_hat @ dense).norm()), rel=1e-12)


def test_along_is_bounded_by_frobenius_and_zero_orthogonal():
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g)
    r_hat = unit(torch.randn(16, generator=g))
    assert lora_delta_along(A, B, 2.0, r_hat) <= lora_delta_frobenius(A, B, 2.0) + 1e-9
    # an update that writes only into coordinates orthogonal to r_hat has no component along it
    B0 = B.clone()
    B0[0] = 0.0
    assert lora_delta_along(A, B0, 2.0, T([1.0] + [0.0] * 15)) == pytest.approx(0.0, abs=1e-12)
