"""Elastic weight consolidation against the safety loss (Kirkpatrick et al. 2017).

The diagonal Fisher F_i = mean over the safety batch of (d loss_n / d theta_i)^2 at the base weights says how much
the safety loss cares about each trainable parameter; the penalty LAMBDA * sum F_i (theta_i - theta_base_i)^2 makes
moving the parameters that matter for refusals expensive and leaves the others free. With LoRA the trainable
parameters are the adapter's, at their initialisation (B = 0, so F is zero for A and the penalty acts on B).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from refusal_probe.core.hashing import cache_key
from refusal_probe.train.safety.safety_batch import SafetyBatch, safety_loss

FISHER_FILE = "fisher.safetensors"


def ewc_penalty(
    params: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """LAMBDA * sum_i F_i (theta_i - theta_base_i)^2 over every named tensor (differentiable in ``params``)."""
    total = None
    for name, p in params.items():
        term = (fisher[name].to(p.device, p.dtype) * (p - base[name].to(p.device, p.dtype)) ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return lam * total


def diagonal_fisher(
    model, batch: SafetyBatch, params: Mapping[str, torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    """Mean of squared per-example gradients of the safety loss, one float32 tensor per parameter (.grad untouched)."""
    names = list(params)
    tensors = [params[n] for n in names]
    acc = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
    for i in range(len(batch)):
        loss = safety_loss(model, batch, [i])
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for a, g in zip(acc, grads, strict=True):
            if g is not None:
                a += g.detach().float() ** 2
    return {n: (a / len(batch)).cpu() for n, a in zip(names, acc, strict=True)}


def fisher_key(revision: str, batch: SafetyBatch, names: list[str]) -> str:
    return cache_key(revision, batch.pairs, names, batch.input_ids.tolist())


def cached_fisher(
    model, batch: SafetyBatch, params: Mapping[str, torch.nn.Parameter], cache: Path, revision: str
) -> tuple[dict[str, torch.Tensor], bool]:
    """(Fisher, read from the cache?): estimated once per run at the base weights, then read back on resume."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from refusal_probe.core.io import atomic_write

    key = fisher_key(revision, batch, list(params))
    if cache.is_file():
        try:
            with safe_open(str(cache), "pt") as fh:
                if (fh.metadata() or {}).get("key") == key:
                    return {n: fh.get_tensor(n) for n in params}, True
        except Exception:  # a corrupt cache entry is estimated again
            pass
        print(f"{cache}: stale or corrupt Fisher cache, estimated again")
    fisher = diagonal_fisher(model, batch, params)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.contiguous() for n, t in fisher.items()}
    atomic_write(cache, lambda p: save_file(tensors, str(p), metadata={"key": key}))
    return fisher, False


class EWC:
    """The penalty of a run: base copies of the trainable parameters and their Fisher, kept on the CPU until used."""

    def __init__(
        self, lam: float, params: Mapping[str, torch.nn.Parameter], fisher: Mapping[str, torch.Tensor]
    ):
        self.lam = lam
        self.params = dict(params)
        self.base = {n: p.detach().clone() for n, p in params.items()}
        self.fisher = {
            n: fisher[n].to(p.device, p.dtype) for n, p in params.items()
        }  # moved once, not per step
        self.last = 0.0

    def penalty(self) -> torch.Tensor:
        value = ewc_penalty(self.params, self.base, self.fisher, self.lam)
        self.last = float(value.detach())
        return value

    def to_json(self) -> dict[str, Any]:
        total = sum(float(f.sum()) for f in self.fisher.values())
        n = sum(f.numel() for f in self.fisher.values())
        return {"lambda": self.lam, "fisher_mean": total / n if n else 0.0, "last_penalty": self.last}
