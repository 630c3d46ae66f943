"""The math under the probes, as pure functions over tensors (no files, no models), all in float64.

float64 because the quantities compared across checkpoints are small differences of large numbers: a float32
``Tensor.norm()`` on CPU is off by about 1e-4 relative on 4M-element tensors, the size of the drift being measured.
Zero vectors give nan (0/0), never an exception, so one dead layer does not stop a sweep.

Weight conventions: a linear weight is ``[d_out, d_in]`` (``y = W x``). A module that writes into the residual
stream (o_proj, down_proj) has ``d_out = d_model``, so what its update ``dW`` can write along a residual direction
``r`` is ``r^T dW`` (a ``d_in`` vector). A LoRA update is ``scale * B @ A`` with ``A [r, d_in]`` and
``B [d_out, r]``; its norms come from ``r x r`` Gram matrices without ever forming the ``d_out x d_in`` product.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Elements per chunk when reducing a large tensor in float64: bounds the float64 copy at 32 MiB.
CHUNK_ELEMENTS = 1 << 22


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(dtype=torch.float64)


def mean_difference(harmful_mean: Tensor, harmless_mean: Tensor) -> Tensor:
    """Difference of means (Arditi et al.): the candidate refusal direction, unnormalised, in float64."""
    if harmful_mean.shape != harmless_mean.shape:
        raise ValueError(f"mean shapes differ: {tuple(harmful_mean.shape)} vs {tuple(harmless_mean.shape)}")
    return _f64(harmful_mean) - _f64(harmless_mean)


def unit(v: Tensor, dim: int = -1) -> Tensor:
    """``v / |v|`` along ``dim`` in float64; a zero vector gives nan entries rather than an exception."""
    v = _f64(v)
    return v / torch.linalg.vector_norm(v, dim=dim, keepdim=True)


def cosine(a: Tensor, b: Tensor, dim: int = -1) -> Tensor:
    """Cosine similarity along ``dim`` (broadcast over leading dims), float64; nan if either vector is zero."""
    a, b = _f64(a), _f64(b)
    num = (a * b).sum(dim=dim)
    den = torch.linalg.vector_norm(a, dim=dim) * torch.linalg.vector_norm(b, dim=dim)
    out = num / den
    return out.clamp(-1.0, 1.0)  # nan survives clamp; rounding past +-1 does not


def norm_ratio(a: Tensor, b: Tensor) -> Tensor:
    """``|a| / |b|`` along the last dim, float64 (how much a direction grew or shrank); inf/nan if ``b`` is zero."""
    return torch.linalg.vector_norm(_f64(a), dim=-1) / torch.linalg.vector_norm(_f64(b), dim=-1)


def project(x: Tensor, direction: Tensor) -> Tensor:
    """Scalar projection of each row of ``x`` (last dim) on the unit ``direction``, float64."""
    return (_f64(x) * unit(direction)).sum(dim=-1)


class Float64Buffer:
    """One reused float64 buffer. Converting each streamed tensor to a fresh float64 tensor fragments glibc's heap
    (measured: +150 MiB peak over a 20M-parameter model of 2-4 MiB tensors); copying into a reused buffer keeps the
    peak at the largest chunk."""

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.float64)

    def load(self, x: Tensor) -> Tensor:
        """``x`` as float64, in this buffer (valid until the next load)."""
        n = x.numel()
        if self._buf.numel() < n:
            self._buf = torch.empty(n, dtype=torch.float64)
        out = self._buf[:n].view(x.shape)
        out.copy_(x.detach())
        return out


def sum_of_squares(w: Tensor, buffer: Float64Buffer | None = None) -> float:
    """Sum of squared entries, accumulated in float64 chunk by chunk (memory stays bounded for big tensors)."""
    flat = w.detach().reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        part = flat[start : start + CHUNK_ELEMENTS]
        chunk = buffer.load(part) if buffer is not None else _f64(part)
        total += float(torch.dot(chunk, chunk))
    return total


def frobenius_norm(w: Tensor) -> float:
    """``||w||_F`` accumulated in float64 (a float32 norm drifts by ~1e-4 relative on large tensors)."""
    return math.sqrt(sum_of_squares(w))


def difference_sum_of_squares(a: Tensor, b: Tensor) -> float:
    """``sum((a - b)^2)`` with the subtraction itself done in float64, chunk by chunk."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    fa, fb = a.detach().reshape(-1), b.detach().reshape(-1)
    acc = StreamedDelta()  # the accumulation weights.py streams full checkpoints through
    for start in range(0, fa.numel(), CHUNK_ELEMENTS):
        acc.add(start, fb[start : start + CHUNK_ELEMENTS], fa[start : start + CHUNK_ELEMENTS])
    return acc.delta_sq


def difference_frobenius(a: Tensor, b: Tensor) -> float:
    """``||a - b||_F`` in float64 without a float32 intermediate difference."""
    return math.sqrt(difference_sum_of_squares(a, b))


def _lora_shapes(A: Tensor, B: Tensor) -> None:
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"LoRA factors need A [r, in] and B [out, r]; got A {tuple(A.shape)}, B {tuple(B.shape)}"
        )


def lora_delta_frobenius(A: Tensor, B: Tensor, scale: float) -> float:
    """``||scale * B @ A||_F = |scale| sqrt(trace((B^T B)(A A^T)))`` from r x r Gram matrices, never forming B@A."""
    _lora_shapes(A, B)
    a, b = _f64(A), _f64(B)
    gram_a = a @ a.T  # [r, r]
    gram_b = b.T @ b  # [r, r]
    sq = float((gram_a * gram_b).sum())  # trace(XY) = sum(X * Y^T), both symmetric
    return abs(scale) * math.sqrt(max(sq, 0.0))


def dense_delta_along(delta: Tensor, r_hat: Tensor, out_axis: int = 0) -> float:
    """``||r_hat^T delta||_2``: how much an update to a residual-writing module writes along ``r_hat``.

    ``delta`` is ``[d_model, d_in]`` (``out_axis=0``, nn.Linear) or ``[d_in, d_model]`` (``out_axis=1``, GPT-2's
    Conv1D). ``r_hat`` should be a unit vector; it is used as given.
    """
    if delta.dim() != 2 or r_hat.dim() != 1 or delta.shape[out_axis] != r_hat.shape[0]:
        raise ValueError(
            f"delta {tuple(delta.shape)} has no output axis {out_axis} of size {tuple(r_hat.shape)} for the direction"
        )
    r = _f64(r_hat)
    written = r @ _f64(delta) if out_axis == 0 else _f64(delta) @ r
    return float(torch.linalg.vector_norm(written))


def lora_delta_along(A: Tensor, B: Tensor, scale: float, r_hat: Tensor) -> float:
    """``||r_hat^T (scale * B @ A)||_2 = |scale| sqrt(u^T (A A^T) u)`` with ``u = B^T r_hat``, never forming B@A."""
    _lora_shapes(A, B)
    if r_hat.dim() != 1 or r_hat.shape[0] != B.shape[0]:
        raise ValueError(f"direction {tuple(r_hat.shape)} does not match LoRA output size {B.shape[0]}")
    a, b, r = _f64(A), _f64(B), _f64(r_hat)
    u = b.T @ r  # [r]
    sq = float(u @ (a @ a.T) @ u)
    return abs(scale) * math.sqrt(max(sq, 0.0))


class StreamedDelta:
    """``||B - A||_F^2``, ``||A||_F^2`` and ``||r_hat^T (B - A)||_2`` of a base weight A and its update B, read in
    row chunks: the dense math of :func:`difference_sum_of_squares`, :func:`sum_of_squares` and
    :func:`dense_delta_along`, with memory bounded by one chunk (float64 work in two reused buffers).

    ``out_axis`` as in :func:`dense_delta_along`: 0 for ``[d_model, d_in]`` weights (rows are outputs, so each chunk
    adds ``r_hat[rows]^T dW[rows]`` to a running ``d_in`` vector), 1 for Conv1D's ``[d_in, d_model]`` (rows are inputs,
    so each row adds ``(dW_row . r_hat)^2``).
    """

    def __init__(self, r_hat: Tensor | None = None, out_axis: int = 0) -> None:
        self.r_hat = None if r_hat is None else _f64(r_hat)
        self.out_axis = out_axis
        self.delta_sq = 0.0
        self.base_sq = 0.0
        self._along_vec: Tensor | None = None
        self._along_sq = 0.0
        self._buffers = (Float64Buffer(), Float64Buffer())

    def add(self, start: int, base_rows: Tensor, new_rows: Tensor) -> None:
        """Rows ``start .. start + len(base_rows)`` of A and B."""
        if base_rows.shape != new_rows.shape:
            raise ValueError(f"chunk shapes differ: {tuple(base_rows.shape)} vs {tuple(new_rows.shape)}")
        b = self._buffers[1].load(base_rows)
        self.base_sq += float(torch.dot(b.reshape(-1), b.reshape(-1)))
        d = self._buffers[0].load(new_rows)
        d.sub_(b)  # B - A in float64
        self.delta_sq += float(torch.dot(d.reshape(-1), d.reshape(-1)))
        if self.r_hat is None:
            return
        if self.out_axis == 0:
            part = self.r_hat[start : start + d.shape[0]] @ d
            self._along_vec = part if self._along_vec is None else self._along_vec + part
        else:
            self._along_sq += float((d @ self.r_hat).square().sum())

    @property
    def along(self) -> float | None:
        if self.r_hat is None:
            return None
        if self.out_axis == 0:
            return 0.0 if self._along_vec is None else float(torch.linalg.vector_norm(self._along_vec))
        return math.sqrt(self._along_sq)
