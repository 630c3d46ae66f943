"""Gradient surgery against a safety gradient (PCGrad-style, one-sided): where the task gradient g points against
the safety gradient g_s (g . g_s < 0), a step along g would raise the safety loss to first order; removing g's
component along g_s makes that first-order change zero while keeping the rest of the task gradient.

``project_conflicting`` is the pure mathematics; ``GradientSurgery`` applies it to a model's .grad tensors and keeps
the statistics the trainer logs and run.json records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

GLOBAL, PER_TENSOR = "global", "per-tensor"


def project_conflicting(g: torch.Tensor, g_s: torch.Tensor) -> tuple[torch.Tensor, bool, float]:
    """(g', projected, cos(g, g_s)): g' = g - (g.g_s / |g_s|^2) g_s when g.g_s < 0, else g itself (the same tensor).

    The dot product runs in float64 so that g' . g_s is zero to the precision of g's dtype.
    """
    a, b = g.reshape(-1).double(), g_s.reshape(-1).double()
    dot, nn = torch.dot(a, b), torch.dot(b, b)
    norm = torch.sqrt(torch.dot(a, a) * nn)
    cos = float(dot / norm) if norm > 0 else 0.0
    if not (dot < 0) or nn == 0:
        return g, False, cos
    out = (a - (dot / nn) * b).reshape(g.shape).to(g.dtype)
    return out, True, cos


def project_per_tensor(
    gs: Sequence[torch.Tensor], g_ss: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[bool], list[float]]:
    """``project_conflicting`` on each (g, g_s) pair: each tensor keeps its own non-conflicting part."""
    out = [project_conflicting(g, s) for g, s in zip(gs, g_ss, strict=True)]
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


def project_global(
    gs: Sequence[torch.Tensor], g_ss: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], bool, float]:
    """``project_conflicting`` of the gradient as one vector (one dot product over all tensors), tensor by tensor:
    float64 sums per tensor, so no concatenated copy of a full model's gradient is made."""
    dot = sum(
        (torch.sum(g.double() * s.double()) for g, s in zip(gs, g_ss, strict=True)),
        torch.zeros((), dtype=torch.float64),
    )
    nn = sum((torch.sum(s.double() ** 2) for s in g_ss), torch.zeros((), dtype=torch.float64))
    gg = sum((torch.sum(g.double() ** 2) for g in gs), torch.zeros((), dtype=torch.float64))
    norm = torch.sqrt(gg * nn)
    cos = float(dot / norm) if norm > 0 else 0.0
    if not (dot < 0) or nn == 0:
        return list(gs), False, cos
    c = dot / nn
    return (
        [(g.double() - c.to(g.device) * s.double()).to(g.dtype) for g, s in zip(gs, g_ss, strict=True)],
        True,
        cos,
    )


@dataclass
class SurgeryStats:
    """How often and how strongly surgery projected: what the trainer logs and run.json records."""

    mode: str
    checks: int = 0
    projected_steps: int = 0  # checks where at least one (global: the) gradient was projected
    tensors_seen: int = 0
    tensors_projected: int = 0
    cosines: list[float] = field(default_factory=list)  # cos(g, g_s) before, per check (global) or per tensor

    def record(self, projected: list[bool], cosines: list[float]) -> None:
        self.checks += 1
        self.projected_steps += int(any(projected))
        self.tensors_seen += len(projected)
        self.tensors_projected += sum(projected)
        self.cosines.extend(cosines)

    def to_json(self) -> dict[str, Any]:
        n = len(self.cosines)
        return {
            "mode": self.mode,
            "checks": self.checks,
            "projected_steps": self.projected_steps,
            "fraction_steps_projected": self.projected_steps / self.checks if self.checks else 0.0,
            "fraction_tensors_projected": self.tensors_projected / self.tensors_seen
            if self.tensors_seen
            else 0.0,
            "mean_cosine_before": sum(self.cosines) / n if n else None,
            "min_cosine_before": min(self.cosines) if n else None,
        }


def apply_surgery(
    params: Sequence[torch.nn.Parameter], g_s: Sequence[torch.Tensor], mode: str, stats: SurgeryStats
) -> None:
    """Replace each parameter's .grad (the accumulated task gradient) by its projection; record the statistics."""
    gs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if mode == PER_TENSOR:
        new, projected, cosines = project_per_tensor(gs, g_s)
    else:
        new, one, cos = project_global(gs, g_s)
        projected, cosines = [one], [cos]
    stats.record(projected, cosines)
    for p, g_new, g_old in zip(params, new, gs, strict=True):
        if g_new is not g_old:
            p.grad = g_new
