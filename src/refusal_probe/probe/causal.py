"""Causal drift: does a model still *use* the refusal direction, not only still contain it?

A cosine says whether a checkpoint's direction moved; these measures say whether ablating or adding it still changes
the refusal score (Arditi et al.'s refusal-token log-odds at the last prompt position, ``candidates.refusal_score``),
with forward passes only, on the held-out prompt sets (``harmful_val`` / ``harmless_val``):

- ``score_harmful`` / ``score_harmless``: mean score with no intervention;
- ``score_harmful_ablate_base``: harmful prompts with the **base** model's direction of layer l (chosen position)
  projected out everywhere (``hooks.ablate``); ``score_harmful_ablate_own``: the same with the checkpoint's own
  difference-of-means direction of layer l;
- ``score_harmless_add_base``: harmless prompts with the base direction vector (not normalised) added to the residual
  stream entering block l (``hooks.add``), exactly as direction selection scores a candidate;
- ``necessity_base = score_harmful - score_harmful_ablate_base`` (how much refusal the base direction carries),
  ``necessity_own`` likewise, ``sufficiency_base = score_harmless_add_base - score_harmless``.

Cost: the prompts are tokenised once per model; 2 forwards (harmful, harmless, no intervention) plus 3 per layer
measured (ablate base, ablate own, add base), each over n_val prompts, last position only. At the base model the own
direction is the base one, so its ablation is not run again (2 + 2 per layer). A zero direction (layer 0, where every
prompt ends in the same template tokens) cannot be ablated: its metrics are NaN and cost nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from refusal_probe.core.errors import UserError

SCORES = (
    "score_harmful",
    "score_harmful_ablate_base",
    "score_harmful_ablate_own",
    "score_harmless",
    "score_harmless_add_base",
)
DERIVED = ("necessity_base", "necessity_own", "sufficiency_base")
CAUSAL_METRICS = (*SCORES, *DERIVED)
LAYER_CHOICES = ("refusal", "all")
LAYERS_FLAG = "--causal-layers"


# ----------------------------------------------------------------------------------------------- pure arithmetic


def derived(scores: Mapping[str, float]) -> dict[str, float]:
    """The three differences of mean scores (NaN where an input is NaN)."""
    return {
        "necessity_base": scores["score_harmful"] - scores["score_harmful_ablate_base"],
        "necessity_own": scores["score_harmful"] - scores["score_harmful_ablate_own"],
        "sufficiency_base": scores["score_harmless_add_base"] - scores["score_harmless"],
    }


def mean_scores(per_prompt: Mapping[str, torch.Tensor | None]) -> dict[str, float]:
    """Mean of each per-prompt score array (None, an intervention not run, gives NaN), plus the derived metrics."""
    means = {
        name: (math.nan if per_prompt.get(name) is None else float(torch.as_tensor(per_prompt[name]).mean()))
        for name in SCORES
    }
    return {**means, **derived(means)}


def causal_rows(per_layer: Mapping[int, Mapping[str, float]]) -> list[dict]:
    """Tidy ``{layer, metric, value}`` rows, layers ascending, metrics in ``CAUSAL_METRICS`` order."""
    return [
        {"layer": int(layer), "metric": m, "value": float(per_layer[layer][m])}
        for layer in sorted(per_layer)
        for m in CAUSAL_METRICS
    ]


def check_layers_spec(text: str) -> str:
    """The --causal-layers value as given, or a UserError: ``refusal``, ``all`` or a list such as ``4,8,12``."""
    spec = str(text).strip().lower()
    if spec in LAYER_CHOICES:
        return spec
    parts = [p.strip() for p in spec.split(",")]
    if not spec or not all(p.isdigit() for p in parts):
        raise UserError(
            f"{LAYERS_FLAG} {text!r}: pass refusal, all, or layer numbers separated by commas such as 4,8,12"
        )
    return ",".join(str(int(p)) for p in parts)


def resolve_layers(text: str, n_layers: int, refusal_layer: int) -> list[int]:
    """The layers to measure: always the refusal layer, plus every layer (``all``) or the listed ones."""
    spec = check_layers_spec(text)
    if spec == "all":
        return list(range(n_layers))
    layers = {refusal_layer}
    if spec != "refusal":
        listed = [int(p) for p in spec.split(",")]
        bad = [layer for layer in listed if not 0 <= layer < n_layers]
        if bad:
            raise UserError(
                f"{LAYERS_FLAG} {text}: layer {bad[0]} is out of range: the model has {n_layers} decoder blocks "
                f"(0..{n_layers - 1}); pass layers in that range, refusal or all"
            )
        layers.update(listed)
    return sorted(layers)


def usable(direction: torch.Tensor) -> bool:
    """A direction can be ablated or added: finite and non-zero."""
    norm = torch.linalg.vector_norm(torch.as_tensor(direction).to(torch.float64))
    return bool(torch.isfinite(norm) and norm > 0)


# ----------------------------------------------------------------------------------------------- running the model


@dataclass
class CausalScores:
    """Per layer: each score's per-prompt array (prompt order of the sets; None where not computable), and means."""

    per_prompt: dict[int, dict[str, torch.Tensor | None]] = field(default_factory=dict)
    forwards: int = 0  # forward passes over a whole prompt set

    def means(self) -> dict[int, dict[str, float]]:
        return {layer: mean_scores(scores) for layer, scores in self.per_prompt.items()}

    def rows(self) -> list[dict]:
        return causal_rows(self.means())


def causal_scores(
    model: Any,
    tokenizer: Any,
    harmful_val: list[str],
    harmless_val: list[str],
    base_dirs: Mapping[int, torch.Tensor],
    own_dirs: Mapping[int, torch.Tensor] | None,
    refusal_ids: Sequence[int],
    batch_size: int,
) -> CausalScores:
    """Refusal scores of ``model`` with and without the base / own direction of each layer in ``base_dirs``.

    ``base_dirs`` / ``own_dirs``: layer -> direction vector [d] (the base's and this model's difference of means at
    the chosen position); ``own_dirs=None`` means the model is the base, whose own direction is the base one.
    """
    from refusal_probe.core.batching import model_device
    from refusal_probe.probe.candidates import refusal_score
    from refusal_probe.probe.hooks import ablate, add
    from refusal_probe.probe.scoring import encode_batches, last_logits

    if not harmful_val or not harmless_val:
        raise UserError("causal drift needs at least one held-out harmful and one harmless prompt (--n-val)")
    device = model_device(model)
    harmful_b = encode_batches(tokenizer, harmful_val, batch_size, device)
    harmless_b = encode_batches(tokenizer, harmless_val, batch_size, device)
    out = CausalScores()

    def score(batches) -> torch.Tensor:
        out.forwards += 1
        return refusal_score(last_logits(model, batches), refusal_ids)

    harmful, harmless = score(harmful_b), score(harmless_b)
    for layer in sorted(base_dirs):
        base = torch.as_tensor(base_dirs[layer]).to(torch.float64)
        own = base if own_dirs is None else torch.as_tensor(own_dirs[layer]).to(torch.float64)
        row: dict[str, torch.Tensor | None] = {
            "score_harmful": harmful,
            "score_harmless": harmless,
            "score_harmful_ablate_base": None,
            "score_harmful_ablate_own": None,
            "score_harmless_add_base": None,
        }
        if usable(base):
            with ablate(model, base):
                row["score_harmful_ablate_base"] = score(harmful_b)
            with add(model, base, layer):
                row["score_harmless_add_base"] = score(harmless_b)
        if own_dirs is None or torch.equal(own, base):
            row["score_harmful_ablate_own"] = row["score_harmful_ablate_base"]
        elif usable(own):
            with ablate(model, own):
                row["score_harmful_ablate_own"] = score(harmful_b)
        out.per_prompt[layer] = row
    return out
