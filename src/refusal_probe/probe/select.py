"""Choosing a model's refusal direction among the per-(layer, position) difference-of-means candidates (Arditi et al.
2024): sample the prompts, capture activations, score the candidates (``scoring``) and choose by the rules
(``candidates``). The result is a :class:`~refusal_probe.probe.direction_result.DirectionResult`.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any

from refusal_probe.core.batching import model_device
from refusal_probe.core.errors import UserError
from refusal_probe.models.handle import decoder_layers
from refusal_probe.probe import DEFAULT_BATCH_SIZE, DEFAULT_SEED
from refusal_probe.probe.candidates import choose, layer_cutoff
from refusal_probe.probe.direction_result import DirectionResult
from refusal_probe.probe.refusal_tokens import refusal_token_ids
from refusal_probe.probe.scoring import coarse_to_fine, score_candidates
from refusal_probe.probe.settings import DEFAULT_RULES, Search, SelectionRules, resolved_search


def sample_prompts(prompts: list[str], n: int | None, seed: int) -> list[str]:
    """``n`` prompts drawn without replacement with a fixed seed (all, in order, when n is None or >= len)."""
    if n is not None and n < 1:
        raise UserError(f"prompt count {n} must be at least 1")
    if n is None or n >= len(prompts):
        return list(prompts)
    return random.Random(seed).sample(list(prompts), n)


def check_layer(model, layer: int | None) -> None:
    """A forced --layer must exist; checked before any activation is captured (the costly part)."""
    if layer is None:
        return
    n_blocks = len(decoder_layers(model))
    if not -n_blocks <= layer < n_blocks:
        raise UserError(
            f"--layer {layer} is out of range: the model has {n_blocks} decoder blocks (0..{n_blocks - 1})"
        )


def select_direction(
    model: Any,
    tokenizer: Any,
    harmful_train: list[str],
    harmless_train: list[str],
    harmful_val: list[str],
    harmless_val: list[str],
    *,
    n_train: int | None = None,
    n_val: int | None = None,
    layer: int | None = None,
    position: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    refusal_ids: Sequence[int] | None = None,
    rules: SelectionRules = DEFAULT_RULES,
    backend: str = "hooks",
    seed: int = DEFAULT_SEED,
    progress: bool = True,
    sources: dict[str, str] | None = None,
    activations: tuple[Any, Any] | None = None,
    search: str = Search.FULL.value,
    available: dict[str, int] | None = None,
) -> DirectionResult:
    """Difference-of-means candidates on the train prompts, scored and chosen on the held-out ones.

    ``n_train`` / ``n_val``: sample this many of each prompt list (None: use them all, as sampled by the caller).

    ``search="coarse"`` (the default on CPU via ``"auto"``) scores a subset: see ``coarse_to_fine``.
    ``layer`` and ``position`` both given: that candidate is used (scored alone; a warning says if the filters would
    have discarded it). One of them given: only the candidates at that layer (or position) are scored and chosen from.
    """
    from refusal_probe.probe.activations import capture
    from refusal_probe.probe.measures import mean_difference

    harmful_train_s = sample_prompts(harmful_train, n_train, seed)
    harmless_train_s = sample_prompts(harmless_train, n_train, seed)
    harmful_val_s = sample_prompts(harmful_val, n_val, seed)
    harmless_val_s = sample_prompts(harmless_val, n_val, seed)
    ids = list(refusal_ids) if refusal_ids is not None else refusal_token_ids(tokenizer)

    check_layer(model, layer)
    kw: dict[str, Any] = dict(batch_size=batch_size, backend=backend, progress=progress)
    if activations is not None:  # already captured by the caller on exactly these train prompts
        harmful_acts, harmless_acts = activations
        if (harmful_acts.n, harmless_acts.n) != (len(harmful_train_s), len(harmless_train_s)):
            raise ValueError("activations were captured on other prompts than the sampled train prompts")
    else:
        harmful_acts = capture(model, tokenizer, harmful_train_s, desc="harmful activations", **kw)
        harmless_acts = capture(model, tokenizer, harmless_train_s, desc="harmless activations", **kw)
    directions = mean_difference(harmful_acts.mean, harmless_acts.mean)
    n_layers, n_pos, _ = directions.shape

    if layer is not None:
        if not -n_layers <= layer < n_layers:
            raise UserError(
                f"--layer {layer} is out of range: the model has {n_layers} decoder blocks (0..{n_layers - 1})"
            )
        layer %= n_layers
    if position is not None and not -n_pos <= position < 0:
        raise UserError(
            f"--position {position} is out of range: the template has {n_pos} post-instruction tokens (-{n_pos}..-1)"
        )
    only = None
    if layer is not None or position is not None:
        only = {
            (lyr, pos)
            for lyr in range(n_layers)
            for pos in range(-n_pos, 0)
            if (layer is None or lyr == layer) and (position is None or pos == position)
        }
    settings = dict(
        n_train=n_train,
        n_val=n_val,
        seed=seed,
        batch_size=batch_size,
        backend=backend,
        max_layer_fraction=rules.max_layer_fraction,
        layer_cutoff=layer_cutoff(n_layers, rules.max_layer_fraction),
        skip_late_layers=rules.skip_late_layers,
        kl_threshold=rules.kl_threshold,
        induce_threshold=rules.induce_threshold,
        refusal_ids=ids,
        refusal_tokens=[tokenizer.decode([i]) for i in ids],
        forced_layer=layer,
        forced_position=position,
        prompts={
            name: {
                "n": len(items),
                "available": (available or {}).get(name, len(full)),
                "source": (sources or {}).get(name, ""),
            }
            for name, items, full in (
                ("harmful_train", harmful_train_s, harmful_train),
                ("harmless_train", harmless_train_s, harmless_train),
                ("harmful_val", harmful_val_s, harmful_val),
                ("harmless_val", harmless_val_s, harmless_val),
            )
        },
    )
    score = functools.partial(
        score_candidates,
        model,
        tokenizer,
        directions,
        harmful_val_s,
        harmless_val_s,
        ids,
        batch_size,
        rules=rules,
        progress=progress,
    )
    if search not in Search.values():
        raise UserError(f"unknown search {search!r}: choose one of {', '.join(Search.values())}")
    search = resolved_search(search, model_device(model).type)
    settings["search"] = search
    if only is None and search == Search.COARSE.value:
        scores = coarse_to_fine(
            score, n_layers, n_pos, layer_cutoff(n_layers, rules.max_layer_fraction), rules.top_layers
        )
        settings["coarse_top_layers"] = rules.top_layers
    else:
        scores = score(only=only)
    if layer is not None and position is not None:
        row = scores[(scores["layer"] == layer) & (scores["position"] == position)].iloc[0]
        reason = str(row["filtered_reason"])
        warning = (
            f"forced candidate layer {layer} position {position} would have been filtered ({reason})"
            if reason
            else ""
        )
        chosen_layer, chosen_pos = layer, position
    else:
        row = choose(scores)
        warning = str(row["warning"])
        chosen_layer, chosen_pos = int(row["layer"]), int(row["position"])
    return DirectionResult(
        directions=directions,
        layer=chosen_layer,
        position=chosen_pos,
        direction=directions[chosen_layer, n_pos + chosen_pos].clone(),
        scores=scores,
        settings=settings,
        warning=warning,
    )
