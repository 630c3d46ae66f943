"""Residual-stream activations at the post-instruction positions, averaged over a prompt set.

Layer ``l`` is the residual stream entering decoder block ``l`` (``resid_pre``, as in Arditi et al.). HF's
``hidden_states[0]`` is the embedding output and its last hidden state is after the final norm, so we read the blocks'
inputs with forward pre-hooks instead, copy only the last P positions (left padding puts the post-instruction tokens
there), run the body model without its LM head, and stop before the last block's computation, which nothing reads.
Means are accumulated in float64 on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from refusal_probe.core.batching import (
    left_pad,
    length_sorted_batches,
    model_device,
    pad_token_id,
    position_ids,
)
from refusal_probe.core.errors import UserError
from refusal_probe.core.template import tokenize_prompts
from refusal_probe.models.handle import decoder_layers, hidden_size
from refusal_probe.probe.settings import BACKENDS

__all__ = [
    "Activations",
    "BACKENDS",
    "body_model",
    "capture",
    "decoder_layers",
    "resid_pre_hooks",
]


@dataclass
class Activations:
    mean: torch.Tensor  # float64 [L, P, d]: mean residual stream over prompts
    n: int  # number of prompts
    positions: list[int]  # negative offsets of the P post-instruction tokens, e.g. [-5, ..., -1]
    per_prompt: torch.Tensor | None = None  # float32 [n, L, P, d], only when keep=True (for probes)

    def index(self, position: int) -> int:
        """Index on the P axis of a negative offset such as -1 (the last post-instruction token)."""
        if position not in self.positions:
            raise UserError(f"position {position} was not captured; choose one of {self.positions}")
        return self.positions.index(position)


def _unwrap(model: Any) -> Any:
    """The plain HF model, also through a PeftModel (whose LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def body_model(model: Any) -> torch.nn.Module:
    """The transformer body without the LM head (``model.model`` for HF causal LMs)."""
    inner = _unwrap(model)
    body = getattr(inner, "base_model", inner)
    return body if isinstance(body, torch.nn.Module) else inner


class _Stop(Exception):
    """Raised by the last block's pre-hook: its output is never read, so its compute is skipped."""


@contextlib.contextmanager
def resid_pre_hooks(
    layers: torch.nn.ModuleList, n_last: int, sink: list, stop_after_last: bool = True
) -> Iterator[None]:
    """Pre-hooks that put the last ``n_last`` positions of each block's input into ``sink[l]``; always removed."""

    def make(layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            sink[layer] = hidden[:, -n_last:, :].detach()
            if stop_after_last and layer == len(layers) - 1:
                raise _Stop

        return hook

    handles = [block.register_forward_pre_hook(make(i), with_kwargs=True) for i, block in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Accumulator:
    """Running float64 sum on the CPU (plus float32 per-prompt copies when asked), with a finiteness check."""

    def advice(self) -> str:
        if self.dtype in (torch.float16, torch.bfloat16):
            return f"the model runs in {str(self.dtype).removeprefix('torch.')}, which overflowed; load it in float32"
        return (
            "the model runs in float32, so this is not a precision overflow: its weights or its chat template produce "
            "NaN/inf (a diverged checkpoint?); check the checkpoint against its base"
        )

    def __init__(self, n: int, n_layers: int, n_pos: int, d: int, keep: bool, dtype: Any = None):
        self.dtype = dtype  # the model's compute dtype: the advice on NaN depends on it
        self.sum = torch.zeros(n_layers, n_pos, d, dtype=torch.float64)
        self.per_prompt = torch.empty(n, n_layers, n_pos, d, dtype=torch.float32) if keep else None

    def add(self, layer_acts: list[torch.Tensor], index: list[int]) -> None:
        for layer, act in enumerate(layer_acts):
            act = act.to("cpu", torch.float64)
            finite = torch.isfinite(act).flatten(1).all(1)
            if not bool(finite.all()):
                bad = index[int((~finite).nonzero()[0])]
                raise UserError(
                    f"non-finite (NaN/inf) activation at layer {layer} for prompt {bad}: {self.advice()}"
                )
            self.sum[layer] += act.sum(0)
            if self.per_prompt is not None:
                self.per_prompt[index, layer] = act.to(torch.float32)


def capture(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    batch_size: int = 16,
    keep: bool = False,
    backend: str = "hooks",
    progress: bool = True,
    desc: str = "activations",
    system: str | None = None,
) -> Activations:
    """Mean resid_pre activations [L, P, d] at the P post-instruction tokens of the model's chat template."""
    from tqdm.auto import tqdm

    if not prompts:
        raise UserError(f"no prompts to capture activations for ({desc}): pass at least one prompt")
    if backend not in BACKENDS:
        raise UserError(f"unknown activation backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} must be at least 1")
    ids, post = tokenize_prompts(tokenizer, prompts, system=system)
    n_pos = len(post)
    layers = decoder_layers(model)
    d = hidden_size(model)
    if d is None:
        raise UserError(
            f"{type(model).__name__}: its config names no hidden_size; this architecture is not supported"
        )
    acc = _Accumulator(len(prompts), len(layers), n_pos, d, keep, dtype=_compute_dtype(model))
    batches = length_sorted_batches(ids, batch_size)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    run = _run_hooks if backend == "hooks" else _run_transformer_lens
    stream = run(model, tokenizer, ids, batches, layers, n_pos)
    try:
        for index, layer_acts in stream:
            assert len(layer_acts) == len(layers) and layer_acts[0].shape == (len(index), n_pos, d)
            acc.add(layer_acts, index)
            bar.update(len(index))
    finally:
        stream.close()  # removes hooks / restores the model now, even when a batch raised
        bar.close()
    mean = acc.sum / len(prompts)
    assert mean.shape == (len(layers), n_pos, d) and mean.dtype == torch.float64
    return Activations(mean=mean, n=len(prompts), positions=list(range(-n_pos, 0)), per_prompt=acc.per_prompt)


def _compute_dtype(model: Any) -> Any:
    try:
        return next(p.dtype for p in model.parameters() if p.is_floating_point())
    except (StopIteration, AttributeError, TypeError):
        return None


def _run_hooks(model, tokenizer, ids, batches, layers, n_pos):
    body = body_model(model)
    device = model_device(model)
    pad = pad_token_id(tokenizer)
    sink: list = [None] * len(layers)
    with torch.inference_mode(), resid_pre_hooks(layers, n_pos, sink):
        for index in batches:
            input_ids, mask = left_pad([ids[i] for i in index], pad)
            sink[:] = [None] * len(layers)
            try:
                body(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=position_ids(mask).to(device),
                    use_cache=False,
                )
            except _Stop:
                pass
            yield index, list(sink)


@contextlib.contextmanager
def _restored(model: Any) -> Iterator[None]:
    """Undo what booting a TransformerBridge does to the caller's model: it swaps submodules and attention kernel."""
    children = [(m, dict(m._modules)) for m in model.modules()]
    attn = getattr(model.config, "_attn_implementation", None)
    try:
        yield
    finally:
        for module, mods in children:
            module._modules.clear()
            module._modules.update(mods)
        if attn is not None and getattr(model.config, "_attn_implementation", None) != attn:
            try:
                model.set_attn_implementation(attn)
            except Exception:  # older/odd models: fall back to the config field the kernels read
                model.config._attn_implementation = attn


def _run_transformer_lens(model, tokenizer, ids, batches, layers, n_pos):
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as exc:
        raise UserError(
            "backend 'transformer-lens' needs transformer-lens 4: pip install refusal-probe[tl]"
        ) from exc
    inner = _unwrap(model)
    device = model_device(model)
    pad = pad_token_id(tokenizer)
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(len(layers))]
    with _restored(inner):
        name = str(getattr(inner.config, "_name_or_path", "") or "local-model")
        bridge = TransformerBridge.boot_transformers(name, hf_model=inner, tokenizer=tokenizer)
        with torch.inference_mode():
            for index in batches:
                input_ids, mask = left_pad([ids[i] for i in index], pad)
                _, cache = bridge.run_with_cache(
                    input_ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=position_ids(mask).to(device),
                    names_filter=names,
                    return_type=None,
                )
                yield index, [cache[name][:, -n_pos:, :] for name in names]
