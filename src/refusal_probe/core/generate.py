"""Batched greedy generation for evaluation.

Prompts are formatted with the model's own chat template, sorted by length (longest first, so an out-of-memory
error shows up in the first batch) and left-padded; results come back in input order.

Two modes:
- full length (``stop=None``): HF ``model.generate``, greedy, up to ``max_new_tokens`` or EOS.
- early exit (``stop`` given): when only the refusal verdict is needed, a sequence is finished as soon as the
  verdict is settled (EOS, or ``stop(decoded_text)`` is true, e.g. a refusal keyword matched). Our own decode loop
  over the model's forward and a DynamicCache: finished rows leave the batch and the KV cache
  (``batch_select_indices``) and waiting prompts are prefilled and merged into the freed rows (continuous
  batching), so no step is spent on finished rows, which HF ``generate`` with a stopping criterion still computes.
  A freed row is refilled at once when every row in flight is a long answer (past ``SETTLED`` tokens): the
  number of decode steps is set by when the last long answers start, so no prompt waits behind them. Cache
  layers append in place into a buffer with headroom (HF's DynamicLayer copies the whole cache every step).
  On CPU a decode step costs about the same at batch 4 and 16 (reading the weights dominates): shrinking the batch
  alone saves little, refilling it is what saves time. For a ``stop`` that is monotone (true for a prefix => true
  for every continuation) the verdicts equal those of full-length generation, and the text of every sequence that
  never stopped early is the full-length text (up to float round-off of a different batch composition).

Out-of-memory errors halve the batch and retry (the smaller size is kept for the rest); only a single prompt that
does not fit raises.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from refusal_probe.core.batching import left_pad, model_device
from refusal_probe.core.errors import UserError
from refusal_probe.core.template import format_prompts

SETTLED = 16  # tokens after which a row that has not stopped is taken as a long answer (refusals: <= 14)


@dataclass(frozen=True)
class Generation:
    text: str
    n_tokens: int  # generated tokens, EOS excluded
    finish: str  # "eos" | "stop" (early exit: stop() was true) | "length"


def format_chat(tokenizer, prompts: Sequence[str]) -> list[str]:
    """Each prompt as one user turn in the chat template: the same text the probe extracts directions from."""
    return format_prompts(tokenizer, list(prompts))


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a turn: the generation config's EOS ids plus the tokenizer's."""
    ids: set[int] = set()
    cfg = getattr(model, "generation_config", None)
    for value in (getattr(cfg, "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _fast_decoder(tokenizer) -> Callable[[list[int]], str]:
    """The text the stop test sees at every step: the Rust backend's decode (half the cost of HF's wrapper, and
    the same text when no clean-up of tokenization spaces is configured), else ``tokenizer.decode``."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda tokens: backend.decode(tokens, skip_special_tokens=True)
    return lambda tokens: _decode(tokenizer, tokens)


def _greedy_config(model, tokenizer, max_new_tokens: int, pad_id: int, eos: set[int]):
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos) or None,
        bos_token_id=getattr(getattr(model, "generation_config", None), "bos_token_id", None),
    )


@torch.inference_mode()
def _full_batch(model, tokenizer, seqs, max_new_tokens: int, pad_id: int, eos: set[int]) -> list[Generation]:
    ids, mask = (t.to(model_device(model)) for t in left_pad(seqs, pad_id))
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        generation_config=_greedy_config(model, tokenizer, max_new_tokens, pad_id, eos),
    )
    results = []
    for row in out[:, ids.shape[1] :].tolist():
        toks, finish = [], "length"
        for t in row:
            if t in eos:
                finish = "eos"
                break
            toks.append(t)
        if finish == "length" and len(toks) < max_new_tokens:  # padded after an earlier EOS of the batch
            finish = "eos"
        results.append(Generation(_decode(tokenizer, toks), len(toks), finish))
    return results


class _EarlyExit:
    """Greedy decode loop over the model's forward with a KV cache, as continuous batching: finished rows leave the
    batch and the cache, and waiting prompts are prefilled and merged in (left-padded to the cache's length), so the
    batch stays full while anything is pending. Falls back to fixed batches for caches other than DynamicLayer."""

    def __init__(self, model, tokenizer, seqs, order, max_new_tokens, pad_id, eos, stop, capacity, bar):
        from collections import deque

        self.model, self.tokenizer, self.seqs = model, tokenizer, seqs
        self.max_new_tokens, self.pad_id, self.eos, self.stop = max_new_tokens, pad_id, eos, stop
        self.capacity, self.bar = capacity, bar
        self.decode = _fast_decoder(tokenizer)
        self.device = model_device(model)
        self.pending = deque(order)
        self.results: dict[int, Generation] = {}
        self._reset()

    def _reset(self) -> None:
        self.rows: list[int] = []  # batch row -> index into seqs
        self.admitting: list[int] = []  # prompts being prefilled (not in rows yet)
        self.tokens: dict[int, list[int]] = {}
        # set together when the first prompts are admitted; None while no row is in flight
        self.cache: Any = None
        self.mask: Any = None
        self.last_pos: Any = None
        self.next_tok: Any = None
        self.refillable = True

    @torch.inference_mode()
    def run(self) -> dict[int, Generation]:
        while self.pending or self.rows:
            free = self.capacity - len(self.rows)
            try:
                if self._should_admit(free):
                    self._admit(min(free, len(self.pending)))
                elif self.rows:
                    self._step()
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise
                self._back_off()
        return self.results

    def _should_admit(self, free: int) -> bool:
        """Refill when a quarter of the batch is free, or any row is free and every row in flight is past
        ``SETTLED`` tokens: such rows are long answers that will not free their slot soon, so waiting for a
        bigger refill would only start the next prompts (and their own long answers) later."""
        if not self.pending:
            return False
        if not self.rows:
            return True
        if not self.refillable or free < 1:
            return False
        if free >= max(1, self.capacity // 4):
            return True
        return all(len(self.tokens[i]) >= SETTLED for i in self.rows)

    def _back_off(self) -> None:
        """Out of memory: the rows in flight start again later, with half the batch."""
        in_flight = self.rows + [i for i in self.admitting if i not in self.results and i not in self.rows]
        _free_memory()
        if self.capacity == 1:
            longest = max((len(self.seqs[i]) for i in in_flight), default=0)
            raise UserError(
                f"out of memory generating a single prompt of {longest} tokens with max_new_tokens="
                f"{self.max_new_tokens}; lower --max-new-tokens or use a device with more memory"
            )
        self.pending.extendleft(reversed(in_flight))
        self._reset()
        _free_memory()
        self.capacity = max(1, self.capacity // 2)
        self.bar.set_postfix(batch=self.capacity, refresh=False)

    def _forward(self, ids, mask, positions, cache, last_only: bool):
        kw = {"logits_to_keep": 1} if last_only else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **kw,
        )
        return out.logits[:, -1].argmax(-1), out.past_key_values

    def _new_cache(self):
        """HF's DynamicCache for the model, its plain layers swapped for growing ones (same numbers, no
        whole-cache copy per step); sliding-window and other layer kinds are left as they are."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        layers = getattr(cache, "layers", None)
        if layers and all(type(layer).__name__ == "DynamicLayer" for layer in layers):
            grow = _growing_layer_class()
            cache.layers = [grow() for _ in layers]
        return cache

    def _admit(self, k: int) -> None:
        new = [self.pending.popleft() for _ in range(k)]
        self.admitting = new
        ids, mask = (t.to(self.device) for t in left_pad([self.seqs[i] for i in new], self.pad_id))
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        next_tok, cache = self._forward(ids, mask, positions, self._new_cache(), True)
        for i in new:
            self.tokens[i] = []
        keep = self._process(new, next_tok)
        if not keep:
            self.admitting = []
            return
        sel = torch.tensor(keep, device=self.device)
        cache.batch_select_indices(sel)
        new_rows = [new[b] for b in keep]
        mask, last_pos, next_tok = mask[sel], positions[sel, -1], next_tok[sel]
        if not self.rows:
            self.rows, self.cache, self.mask, self.last_pos, self.next_tok = (
                new_rows,
                cache,
                mask,
                last_pos,
                next_tok,
            )
            self.refillable = all(
                type(layer).__name__ in ("DynamicLayer", "GrowingLayer")
                for layer in getattr(cache, "layers", [])
            )
            self.admitting = []
            self._trim()
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old_layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
            old_layer.keys = torch.cat([_pad_left(old_layer.keys, width), _pad_left(new_layer.keys, width)])
            old_layer.values = torch.cat(
                [_pad_left(old_layer.values, width), _pad_left(new_layer.values, width)]
            )
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.last_pos = torch.cat([self.last_pos, last_pos])
        self.next_tok = torch.cat([self.next_tok, next_tok])
        self.rows = self.rows + new_rows
        self.admitting = []

    def _step(self) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.last_pos = self.last_pos + 1
        self.next_tok, self.cache = self._forward(
            self.next_tok[:, None], self.mask, self.last_pos[:, None], self.cache, False
        )
        keep = self._process(self.rows, self.next_tok)
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._reset_rows()
            return
        sel = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(sel)
        self.mask, self.last_pos, self.next_tok = self.mask[sel], self.last_pos[sel], self.next_tok[sel]
        self.rows = [self.rows[b] for b in keep]
        self._trim()

    def _reset_rows(self) -> None:
        refillable = self.refillable
        self.rows, self.cache, self.mask, self.last_pos, self.next_tok = [], None, None, None, None
        self.refillable = refillable

    def _trim(self) -> None:
        """Drop cache columns that are padding for every remaining row (left-most first)."""
        if not self.refillable:
            return
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start == 0:
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
        self.mask = self.mask[:, start:]

    def _process(self, row_ids: list[int], next_tok: torch.Tensor) -> list[int]:
        """Append each row's new token or finish it (EOS, stop, length); return the batch rows that go on."""
        keep = []
        for b, (i, t) in enumerate(zip(row_ids, next_tok.tolist(), strict=True)):
            toks = self.tokens[i]
            if t in self.eos:
                self._finish(i, "eos")
                continue
            toks.append(t)
            if self.stop(self.decode(toks)):
                self._finish(i, "stop")
            elif len(toks) >= self.max_new_tokens:
                self._finish(i, "length")
            else:
                keep.append(b)
        return keep

    def _finish(self, i: int, finish: str) -> None:
        toks = self.tokens.pop(i)
        self.results[i] = Generation(_decode(self.tokenizer, toks), len(toks), finish)
        self.bar.update(1)


@functools.cache
def _growing_layer_class():
    """A DynamicLayer that appends in place into a buffer with room for ``HEADROOM`` more tokens, instead of
    ``torch.cat`` copying the whole cache of every layer at every decode step (HF's DynamicLayer). Keys/values are
    views of the buffer; when our loop replaces them (rows leave, refill, trim) the next update re-buffers once."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        _layer_type = None  # not registered in HF's layer-type mapping

        def __init__(self) -> None:
            super().__init__()
            self._view: torch.Tensor | None = None
            self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            keys, values = self.keys, self.values
            old = keys.shape[-2] if keys is not None and keys.dim() == 4 else 0
            end = old + key_states.shape[-2]
            bufs = self._buffers
            if bufs is None or self.keys is not self._view or end > bufs[0].shape[-2]:
                shape = (*key_states.shape[:-2], end + HEADROOM, key_states.shape[-1])
                bufs = (key_states.new_empty(shape), value_states.new_empty(shape))
                if old:
                    bufs[0][..., :old, :] = keys
                    bufs[1][..., :old, :] = values
                self._buffers = bufs
            bufs[0][..., old:end, :] = key_states
            bufs[1][..., old:end, :] = value_states
            self.keys, self.values = bufs[0][..., :end, :], bufs[1][..., :end, :]
            self._view = self.keys
            return self.keys, self.values

    return GrowingLayer


HEADROOM = (
    64  # tokens of room a re-buffered cache layer gets (one copy per 64 decode steps instead of every step)
)


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad dim -1 (masks) or dim -2 (keys/values: batch, heads, seq, dim) on the left to ``width``."""
    dim = -1 if t.dim() == 2 else -2
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def generate_detailed(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    stop: Callable[[str], bool] | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[Generation]:
    """Like ``generate`` but each result also says how many tokens were generated and why it ended."""
    from tqdm.auto import tqdm

    if max_new_tokens < 1 or batch_size < 1:
        raise UserError(f"max_new_tokens and batch_size must be >= 1 (got {max_new_tokens}, {batch_size})")
    if not prompts:
        return []
    texts = format_chat(tokenizer, prompts)
    seqs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
    with tqdm(total=len(seqs), desc=desc, unit="prompt", disable=not progress) as bar:
        if stop is not None:
            done = _EarlyExit(
                model, tokenizer, seqs, order, max_new_tokens, pad_id, eos, stop, batch_size, bar
            ).run()
            return [done[i] for i in range(len(seqs))]
        return _full_length(model, tokenizer, seqs, order, max_new_tokens, pad_id, eos, batch_size, bar)


def _full_length(
    model, tokenizer, seqs, order, max_new_tokens, pad_id, eos, batch_size, bar
) -> list[Generation]:
    """Fixed batches through HF ``generate``; out-of-memory halves the batch (kept for the rest)."""
    results: list[Generation | None] = [None] * len(seqs)
    size, pos = batch_size, 0
    while pos < len(order):
        chunk = order[pos : pos + size]
        batch = [seqs[i] for i in chunk]
        try:
            outs = _full_batch(model, tokenizer, batch, max_new_tokens, pad_id, eos)
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            _free_memory()
            if len(chunk) == 1:
                raise UserError(
                    f"out of memory generating a single prompt of {len(batch[0])} tokens with "
                    f"max_new_tokens={max_new_tokens}; lower --max-new-tokens or use a device with more memory"
                ) from None
            size = max(1, len(chunk) // 2)
            bar.set_postfix(batch=size, refresh=False)
            continue
        for i, g in zip(chunk, outs, strict=True):
            results[i] = g
        pos += len(chunk)
        bar.update(len(chunk))
    return [g for g in results if g is not None]


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    stop: Callable[[str], bool] | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy responses to ``prompts`` (chat template applied), in input order. See the module doc for ``stop``."""
    gens = generate_detailed(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop=stop,
        progress=progress,
    )
    return [g.text for g in gens]
