"""Interventions on the residual stream: ablate a direction everywhere, or add a vector at one layer.

Both are context managers over the model's decoder blocks that always remove their hooks (try/finally), so a model
is never left modified after an exception. They work in plain forwards and in batched ``generate`` (the hooks run
at every decoding step, on every position, padding included, which is harmless because padding is masked out).

Ablation follows Arditi et al. 2024 (``get_all_direction_ablation_hooks``): the component along the unit direction is
removed from the input of block 0 and from every attention and MLP output, so no block ever reads or writes along the
direction. We also clean every block's output: for plain pre-norm blocks that is already zero along the direction
(a no-op up to rounding), and for blocks that normalise their sublayer outputs before adding them (Gemma) it is what
keeps the residual stream itself free of the direction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from refusal_probe.core.errors import UserError
from refusal_probe.models.handle import decoder_layers, hidden_size

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")


def unit_vector(direction: torch.Tensor) -> torch.Tensor:
    """``direction / |direction|`` in float64; a zero or non-finite direction cannot be ablated."""
    v = torch.as_tensor(direction).detach().to("cpu", torch.float64).flatten()
    norm = torch.linalg.vector_norm(v)
    if not torch.isfinite(norm) or norm == 0:
        raise UserError(f"the direction to ablate has norm {float(norm)}; it must be finite and non-zero")
    return v / norm


def project_out(hidden: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """``h - (h.u) u`` along the last axis, computed in at least float32 and returned in ``hidden``'s dtype."""
    work = hidden if hidden.dtype in (torch.float32, torch.float64) else hidden.float()
    u = unit.to(device=work.device, dtype=work.dtype)
    out = work - (work @ u).unsqueeze(-1) * u
    return out.to(hidden.dtype)


def _map_hidden(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to the hidden states in a block/sublayer result: a tensor, or the first item of a tuple."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return (fn(value[0]), *value[1:])
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [fn(value[0]), *value[1:]]
    raise TypeError(f"cannot find hidden states in a {type(value).__name__}")


def _pre_hook(fn: Callable[[torch.Tensor], torch.Tensor]):
    """A forward pre-hook (with kwargs) rewriting a block's input hidden states, passed positionally or by name."""

    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        raise TypeError(f"{type(module).__name__} received no hidden states to intervene on")

    return hook


def _output_hook(fn: Callable[[torch.Tensor], torch.Tensor]):
    def hook(module, args, output):
        return _map_hidden(output, fn)

    return hook


def _child(block: torch.nn.Module, names: tuple[str, ...]) -> torch.nn.Module | None:
    for name in names:
        module = getattr(block, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


@contextlib.contextmanager
def hooked(
    pre_hooks: list[tuple[torch.nn.Module, Callable]], hooks: list[tuple[torch.nn.Module, Callable]]
) -> Iterator[None]:
    """Register forward pre-hooks (with kwargs) and forward hooks for the duration of the block; always removed."""
    handles = []
    try:
        for module, fn in pre_hooks:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        for module, fn in hooks:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def ablate(model: Any, direction: torch.Tensor, *, sublayers: bool = True) -> Iterator[None]:
    """Project the (normalised) direction out of the residual stream at every layer and position.

    Hooks: block 0's input, every block's output, and (``sublayers=True``, Arditi et al.) every attention and MLP
    output inside the blocks, so the MLP of a block also never sees the attention's write along the direction.
    """
    unit = unit_vector(direction)
    layers = decoder_layers(model)
    _check_size(unit, model)

    cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        key = (hidden.device, hidden.dtype)
        if key not in cache:  # one copy per device/dtype, not one per hook call
            work = hidden.dtype if hidden.dtype in (torch.float32, torch.float64) else torch.float32
            cache[key] = unit.to(device=hidden.device, dtype=work)
        return project_out(hidden, cache[key])

    hooks: list[tuple[torch.nn.Module, Callable]] = []
    for block in layers:
        if sublayers:
            for child in (_child(block, ATTENTION_NAMES), _child(block, MLP_NAMES)):
                if child is not None:
                    hooks.append((child, _output_hook(fn)))
        hooks.append((block, _output_hook(fn)))
    with hooked([(layers[0], _pre_hook(fn))], hooks):
        yield


@contextlib.contextmanager
def add(model: Any, vector: torch.Tensor, layer: int, *, coeff: float = 1.0) -> Iterator[None]:
    """Add ``coeff * vector`` (not normalised) to the residual stream entering block ``layer``, at every position."""
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise UserError(
            f"layer {layer} is out of range: the model has {len(layers)} decoder blocks (0..{len(layers) - 1})"
        )
    v = torch.as_tensor(vector).detach().to("cpu", torch.float64).flatten() * coeff
    if not bool(torch.isfinite(v).all()):
        raise UserError("the vector to add has non-finite entries")
    _check_size(v, model)
    cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        key = (hidden.device, hidden.dtype)
        if key not in cache:
            cache[key] = v.to(device=hidden.device, dtype=hidden.dtype)
        return hidden + cache[key]

    with hooked([(layers[layer], _pre_hook(fn))], []):
        yield


def _check_size(vector: torch.Tensor, model: Any) -> None:
    d = hidden_size(model)
    if d is not None and vector.numel() != d:
        raise UserError(f"direction has {vector.numel()} dimensions but the model's residual stream has {d}")
