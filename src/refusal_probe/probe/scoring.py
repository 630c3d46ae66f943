"""Running the model to score refusal-direction candidates on held-out prompts (the rules are in ``candidates``).

Prompts are tokenised once and reused by every candidate; each scored candidate costs one forward over the harmful
and two over the harmless prompts, last position only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from refusal_probe.core.batching import (
    left_pad,
    length_sorted_batches,
    model_device,
    pad_token_id,
    position_ids,
)
from refusal_probe.core.errors import UserError
from refusal_probe.probe import DEFAULT_BATCH_SIZE
from refusal_probe.probe.candidates import (
    LATE_LAYER,
    NOT_SCORED,
    SCORE_COLUMNS,
    filter_reasons,
    kl_last,
    layer_cutoff,
    refusal_score,
)
from refusal_probe.probe.settings import DEFAULT_RULES, SelectionRules


@dataclass
class Batch:
    index: list[int]  # rows of the prompt list, in batch order
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


def encode_batches(tokenizer: Any, prompts: list[str], batch_size: int, device: Any) -> list[Batch]:
    """Tokenise once (chat template, left padding, similar lengths together) for reuse by every candidate."""
    from refusal_probe.core.template import tokenize_prompts

    if batch_size < 1:
        raise UserError(f"batch size {batch_size} must be at least 1")
    ids, _ = tokenize_prompts(tokenizer, prompts)
    pad = pad_token_id(tokenizer)
    batches = []
    for index in length_sorted_batches(ids, batch_size):
        input_ids, mask = left_pad([ids[i] for i in index], pad)
        batches.append(Batch(index, input_ids.to(device), mask.to(device), position_ids(mask).to(device)))
    return batches


def last_logits(model: Any, batches: list[Batch]) -> torch.Tensor:
    """Next-token logits at the last position of every prompt, float32 on the CPU, in prompt order."""
    n = sum(len(b.index) for b in batches)
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for b in batches:
            kwargs = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
            try:
                logits = model(**kwargs, use_cache=False, logits_to_keep=1).logits
            except TypeError:  # a model without logits_to_keep: compute them all, keep the last
                logits = model(**kwargs, use_cache=False).logits
            logits = logits[:, -1, :].to("cpu", torch.float32)
            if out is None:
                out = torch.empty(n, logits.shape[-1], dtype=torch.float32)
            out[b.index] = logits
    assert out is not None
    return out


def score_candidates(
    model: Any,
    tokenizer: Any,
    candidates: torch.Tensor,
    harmful_val: list[str],
    harmless_val: list[str],
    refusal_ids: Sequence[int],
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    rules: SelectionRules = DEFAULT_RULES,
    only: set[tuple[int, int]] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per (layer, position) of ``candidates`` [L, P, d] with its scores and ``filtered_reason``.

    ``only``: score just these (layer, position) pairs (positions negative, -P..-1); the rest are "not scored".
    ``rules.skip_late_layers`` (ignored with ``only``): do not score the layers the layer rule discards anyway (saves
    1 - max_layer_fraction of the time; their rows read "layer;not scored").
    Each scored candidate costs one forward over the harmful and two over the harmless prompts, last position only.
    """
    from tqdm.auto import tqdm

    from refusal_probe.probe.hooks import ablate, add

    if candidates.ndim != 3:
        raise ValueError(f"candidates must be [L, P, d], got shape {tuple(candidates.shape)}")
    if not harmful_val or not harmless_val:
        raise UserError("direction selection needs at least one held-out harmful and one harmless prompt")
    n_layers, n_pos, _ = candidates.shape
    device = model_device(model)
    harmful_b = encode_batches(tokenizer, harmful_val, batch_size, device)
    harmless_b = encode_batches(tokenizer, harmless_val, batch_size, device)
    base_harmless = last_logits(model, harmless_b)
    harmful_baseline = float(refusal_score(last_logits(model, harmful_b), refusal_ids).mean())
    harmless_baseline = float(refusal_score(base_harmless, refusal_ids).mean())

    pairs = [(layer, pos) for layer in range(n_layers) for pos in range(-n_pos, 0)]
    cutoff = layer_cutoff(n_layers, rules.max_layer_fraction)
    if only is not None:
        todo = {p for p in pairs if p in only}
    else:
        todo = {p for p in pairs if not (rules.skip_late_layers and p[0] >= cutoff)}
    rows = []
    bar = tqdm(total=len(todo), desc="scoring direction candidates", unit="cand", disable=not progress)
    try:
        for layer, pos in pairs:
            vector = candidates[layer, n_pos + pos]
            row: dict[str, Any] = dict(
                layer=layer,
                position=pos,
                direction_norm=float(torch.linalg.vector_norm(vector.to(torch.float64))),
                harmful_baseline=harmful_baseline,
                harmless_baseline=harmless_baseline,
                ablation_score=math.nan,
                steering_score=math.nan,
                kl=math.nan,
                filtered_reason="",
            )
            if (layer, pos) not in todo:
                late = only is None and layer >= cutoff  # skipped by skip_late_layers, not by `only`
                row["filtered_reason"] = f"{LATE_LAYER};{NOT_SCORED}" if late else NOT_SCORED
            elif row["direction_norm"] == 0 or not math.isfinite(row["direction_norm"]):
                pass  # stays NaN: filtered as "nan"
            else:
                with ablate(model, vector):
                    row["ablation_score"] = float(
                        refusal_score(last_logits(model, harmful_b), refusal_ids).mean()
                    )
                    row["kl"] = float(kl_last(base_harmless, last_logits(model, harmless_b)).mean())
                with add(model, vector, layer):
                    row["steering_score"] = float(
                        refusal_score(last_logits(model, harmless_b), refusal_ids).mean()
                    )
            if (layer, pos) in todo:
                bar.update(1)
            rows.append(row)
    finally:
        bar.close()
    df = pd.DataFrame(rows, columns=list(SCORE_COLUMNS))
    df["filtered_reason"] = filter_reasons(df, n_layers, rules)
    return df


def coarse_to_fine(
    score: Callable[..., pd.DataFrame], n_layers: int, n_pos: int, cutoff: int, top_layers: int
) -> pd.DataFrame:
    """Score the last position at every allowed layer, then every position at the ``top_layers`` best layers.

    Each candidate costs three forward passes over the held-out prompts, so on a CPU scoring all L x P of them takes
    hours on a 0.5B model; the best layers by the last position are where the full search's winner sits in practice
    (Arditi et al.'s chosen positions are within a layer of their last-position optimum). Unscored rows say so.
    """
    stage1 = score(only={(layer, -1) for layer in range(1, cutoff)})
    ranked = stage1[stage1["ablation_score"].notna()]
    kept = ranked[ranked["filtered_reason"] == ""]
    best = (kept if len(kept) else ranked).nsmallest(top_layers, "ablation_score")["layer"].tolist()
    stage2 = score(only={(layer, pos) for layer in best for pos in range(-n_pos, -1)})
    scored2 = stage2["ablation_score"].notna() | ~stage2["filtered_reason"].str.contains(NOT_SCORED)
    merged = stage1.copy()
    merged.loc[scored2.to_numpy()] = stage2.loc[scored2].to_numpy()
    late = merged["layer"] >= cutoff
    merged.loc[late, "filtered_reason"] = f"{LATE_LAYER};{NOT_SCORED}"
    return merged
