"""--project-off-refusal (a direction-aware Safe LoRA): updates of the modules that write the residual stream keep no
component along the base refusal direction r (unit, d_model).

Full weights: W <- W_base + (I - r r^T)(W - W_base) on the output side (a Linear's rows; a GPT-2 Conv1D's columns),
and the same for a bias. LoRA: B <- (I - r r^T) B, exact for the update B @ A (r^T B A = 0 whatever A is). Applied
after every optimizer step during training, or once to a saved checkpoint by `refusal-probe project`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import TrainerCallback

from refusal_probe.models.handle import RESIDUAL_WRITERS, decoder_layers


def project_rows(delta: torch.Tensor, r: torch.Tensor, out_dim: int = 0) -> torch.Tensor:
    """(I - r r^T) applied along ``out_dim`` of ``delta`` (a weight update, a bias update or a LoRA B), in float32+.

    out_dim 0: delta [d_model, ...] -> delta - r (r^T delta); out_dim 1: delta [..., d_model] -> delta - (delta r) r^T.
    """
    dt = torch.promote_types(delta.dtype, torch.float32)
    d, u = delta.to(dt), r.to(device=delta.device, dtype=dt)
    if d.ndim == 1:
        return d - u * (u @ d)
    if out_dim == 0:
        return d - torch.outer(u, u @ d)
    return d - torch.outer(d @ u, u)


def component(delta: torch.Tensor, r: torch.Tensor, out_dim: int = 0) -> torch.Tensor:
    """r^T delta along ``out_dim``: what the projection removes (zero after it)."""
    d, u = delta.to(torch.float64), r.to(device=delta.device, dtype=torch.float64)
    if d.ndim == 1:
        return u @ d
    return u @ d if out_dim == 0 else d @ u


def writer_modules(model: Any) -> dict[tuple[int, str], Any]:
    """(block, path in block) -> module for every residual-stream writer (through PEFT wrappers)."""
    out = {}
    for i, block in enumerate(decoder_layers(model)):
        for name, module in block.named_modules():
            if name in RESIDUAL_WRITERS:
                out[(i, name)] = module
    return out


def out_dim_of(module: Any) -> int:
    """Where the output features are on the module's weight: Linear [out, in] -> 0; GPT-2 Conv1D [in, out] -> 1."""
    base = getattr(module, "base_layer", module)
    return 1 if type(base).__name__ == "Conv1D" else 0


def lora_bs(module: Any) -> list[torch.nn.Parameter]:
    """The LoRA B weights of a PEFT-wrapped module (one per adapter), [out, r] whatever the base layer."""
    bs = getattr(module, "lora_B", None)
    return [m.weight for m in bs.values()] if bs is not None else []


class ProjectOffRefusal(TrainerCallback):
    """After every optimizer step, project each trainable writer's update off r (before EMA, monitor and saves)."""

    def __init__(self, unit: torch.Tensor, lora: bool):
        self.unit = unit.to(torch.float32)
        self.lora = lora
        self.base: dict[str, tuple[torch.nn.Parameter, torch.Tensor, int]] = {}
        self.lora_b: list[torch.nn.Parameter] = []
        self.modules: list[str] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.base, self.lora_b, self.modules = {}, [], []
        for (i, name), module in writer_modules(model).items():
            key = f"{i}.{name}"
            if self.lora:
                bs = [b for b in lora_bs(module) if b.requires_grad]
                self.lora_b += bs
                if bs:
                    self.modules.append(key)
                continue
            dim = out_dim_of(module)
            for pname in ("weight", "bias"):
                p = getattr(module, pname, None)
                if isinstance(p, torch.nn.Parameter) and p.requires_grad:
                    # W_base in float32 for these modules only
                    self.base[f"{key}.{pname}"] = (p, p.detach().to(torch.float32).clone(), dim)
            if any(k.startswith(key + ".") for k in self.base):
                self.modules.append(key)
        self.apply()

    def apply(self) -> None:
        with torch.no_grad():
            for b in self.lora_b:
                b.copy_(project_rows(b, self.unit, 0).to(b.dtype))
            for p, w0, dim in self.base.values():
                w0 = w0.to(p.device)
                p.copy_((w0 + project_rows(p.to(torch.float32) - w0, self.unit, dim)).to(p.dtype))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.apply()

    def max_component(self) -> float:
        """max |r^T dW| (full) or |r^T B| (LoRA) over the writers: 0 up to float precision."""
        vals = [component(b.detach(), self.unit, 0).abs().max().item() for b in self.lora_b]
        vals += [
            component(p.detach().to(torch.float32) - w0.to(p.device), self.unit, dim).abs().max().item()
            for p, w0, dim in self.base.values()
        ]
        return max(vals, default=0.0)


# ---- after the fact, on files: `refusal-probe project` ----

_FULL = re.compile(
    r"\.(\d+)\.(" + "|".join(re.escape(w) for w in sorted(RESIDUAL_WRITERS)) + r")\.(weight|bias)$"
)
_LORA = re.compile(
    r"\.(\d+)\.(" + "|".join(re.escape(w) for w in sorted(RESIDUAL_WRITERS)) + r")\.lora_B(\.[^.]+)?\.weight$"
)


def is_writer_weight(name: str) -> bool:
    return _FULL.search(name) is not None


def is_lora_b(name: str) -> bool:
    return _LORA.search(name) is not None


def project_full_tensors(
    tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor], unit: torch.Tensor, out_dim: int = 0
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The writers' tensors as W_base + P (W - W_base), the rest unchanged; and the names projected."""
    out, done = dict(tensors), []
    for name, w in tensors.items():
        if is_writer_weight(name) and name in base and w.shape == base[name].shape:
            w0 = base[name].to(torch.float32)
            out[name] = (w0 + project_rows(w.to(torch.float32) - w0, unit, out_dim)).to(w.dtype).contiguous()
            done.append(name)
    return out, done


def project_lora_tensors(
    tensors: dict[str, torch.Tensor], unit: torch.Tensor
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every writer's lora_B as (I - r r^T) B, the rest unchanged; and the names projected."""
    out, done = dict(tensors), []
    for name, b in tensors.items():
        if is_lora_b(name) and b.shape[0] == unit.shape[0]:
            out[name] = project_rows(b, unit, 0).to(b.dtype).contiguous()
            done.append(name)
    return out, done
