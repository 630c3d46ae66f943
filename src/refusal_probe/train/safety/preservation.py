"""Refusal preservation: a loss LAMBDA * (p - p_base)^2 that keeps the harmful probe set's mean projection p on the
base refusal direction at its base value.

p = mean over the probe prompts of <resid_pre[layer] at the direction's post-instruction position, r>, the signal
Arditi et al. read refusal from. Fine-tuning that erodes refusal lowers p (the harmful prompts stop "looking
harmful" to the model), so holding p keeps that signal while the rest of the model learns the task. The capture is a
forward pre-hook that keeps the graph (probe's capture runs under no_grad and detaches); the forward stops after
that block, so the term costs one partial forward and backward of the probe set per optimizer step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from refusal_probe.core.batching import left_pad, model_device, pad_token_id, position_ids
from refusal_probe.core.template import tokenize_prompts
from refusal_probe.models.handle import decoder_layers


class _Stop(Exception):
    """Raised by the capture hook: the blocks above the direction's layer play no part in the term."""


@contextlib.contextmanager
def capture_resid_pre(model, layer: int, sink: list, stop: bool = True) -> Iterator[None]:
    """A forward pre-hook on block ``layer`` putting its input (with its graph) in ``sink``; always removed."""

    def hook(module, args, kwargs):
        sink.append(args[0] if args else kwargs["hidden_states"])
        if stop:
            raise _Stop

    handle = decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    except _Stop:
        pass
    finally:
        handle.remove()


def resid_pre(model, input_ids, attention_mask, layer: int) -> torch.Tensor:
    """[B, T, d] input of block ``layer`` for left-padded rows, differentiable in the model's parameters."""
    sink: list = []
    device = model_device(model)
    with capture_resid_pre(model, layer, sink):
        model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids(attention_mask).to(device),
            use_cache=False,
        )
    return sink[0]


def mean_projection(model, input_ids, attention_mask, layer: int, unit: torch.Tensor, position: int = -1):
    """Mean over rows of <resid_pre[layer][row, position], unit> (left-padded: -1 is every row's last token)."""
    h = resid_pre(model, input_ids, attention_mask, layer)[:, position, :]
    return (h.float() @ unit.to(h.device, torch.float32)).mean()


def preservation_term(proj: torch.Tensor, proj_base: float, lam: float) -> torch.Tensor:
    return lam * (proj - proj_base) ** 2


class Preservation:
    """The term of a run: the probe prompts (tokenised once), the direction and the base projection."""

    def __init__(self, model, tok, prompts: list[str], direction: Any, lam: float):
        ids, post = tokenize_prompts(tok, prompts)
        self.input_ids, self.attention_mask = left_pad(ids, pad_token_id(tok))
        self.layer, self.unit, self.lam = direction.layer, direction.unit, lam
        # the direction's position among the post-instruction tokens (-1: the last)
        self.position = int(getattr(direction, "position", -1))
        if not -len(post) <= self.position <= -1:
            self.position = -1
        with torch.no_grad():
            self.base = float(self.projection(model))
        self.last_projection = self.base
        self.last_term = 0.0
        self.n_prompts = len(prompts)

    def projection(self, model) -> torch.Tensor:
        return mean_projection(
            model, self.input_ids, self.attention_mask, self.layer, self.unit, self.position
        )

    def term(self, model) -> torch.Tensor:
        proj = self.projection(model)
        value = preservation_term(proj, self.base, self.lam)
        self.last_projection, self.last_term = float(proj.detach()), float(value.detach())
        return value

    def to_json(self) -> dict[str, Any]:
        return {
            "lambda": self.lam,
            "layer": self.layer,
            "position": self.position,
            "prompts": self.n_prompts,
            "base_projection": self.base,
            "last_projection": self.last_projection,
            "last_term": self.last_term,
        }
