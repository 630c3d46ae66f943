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
  ``necessity_own`` likewise, ``sufficiency_base = score_harmless_add_base - score_harmless``;
- ``<derived>_ci_low`` / ``_ci_high``: a 95% percentile interval of each difference from resampling the held-out
  prompts (paired: a resample keeps a prompt's score with and without the intervention together), so a necessity of
  0.1 can be read against the noise of n_val prompts. The interval is over prompts, for this checkpoint's weights.

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

import numpy as np
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
# each difference's paired prompt-bootstrap interval: (derived, with, without)
PAIRS = (
    ("necessity_base", "score_harmful", "score_harmful_ablate_base"),
    ("necessity_own", "score_harmful", "score_harmful_ablate_own"),
    ("sufficiency_base", "score_harmless_add_base", "score_harmless"),
)
INTERVALS = tuple(f"{name}_ci_{end}" for name in DERIVED for end in ("low", "high"))
CAUSAL_METRICS = (*SCORES, *DERIVED, *INTERVALS)
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


def mean_scores(
    per_prompt: Mapping[str, torch.Tensor | None], counts: Mapping[int, np.ndarray] | None = None
) -> dict[str, float]:
    """Mean of each per-prompt score array (None, an intervention not run, gives NaN), plus the derived metrics and,
    given resample ``counts`` (set size n -> [B, n] copies of each prompt), each difference's ``paired_interval``."""
    means = {
        name: (math.nan if per_prompt.get(name) is None else float(torch.as_tensor(per_prompt[name]).mean()))
        for name in SCORES
    }
    out = {**means, **derived(means)}
    if counts is not None:
        for name, with_, without in PAIRS:
            a, b = per_prompt.get(with_), per_prompt.get(without)
            lo, hi = (math.nan, math.nan) if a is None or b is None else paired_interval(a, b, counts[len(a)])
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = lo, hi
    return out


def paired_interval(a, b, counts: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mean(a - b) over resamples of the n prompt pairs: ``counts`` [B, n] copies of each
    prompt per resample (``noise.resample_counts``), a prompt's two scores drawn together."""
    diff = (torch.as_tensor(a) - torch.as_tensor(b)).to(torch.float64).numpy()
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != len(diff):
        raise ValueError(f"resample counts of shape {c.shape} do not fit {len(diff)} prompt pairs")
    means = (c @ diff) / c.sum(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def causal_rows(per_layer: Mapping[int, Mapping[str, float]]) -> list[dict]:
    """Tidy ``{layer, metric, value}`` rows, layers ascending, metrics in ``CAUSAL_METRICS`` order (those present)."""
    return [
        {"layer": int(layer), "metric": m, "value": float(per_layer[layer][m])}
        for layer in sorted(per_layer)
        for m in CAUSAL_METRICS
        if m in per_layer[layer]
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

    def means(self, n_boot: int = 0, seed: int = 0) -> dict[int, dict[str, float]]:
        """Per layer the mean scores and differences; with ``n_boot`` resamples (seeded, the same for every layer and
        checkpoint) each difference's interval too."""
        counts = None
        if n_boot and self.per_prompt:
            from refusal_probe.probe.noise import resample_counts

            rng = np.random.default_rng(seed)
            sizes = sorted(
                {len(s) for row in self.per_prompt.values() for s in row.values() if s is not None}
            )
            counts = {n: resample_counts(rng, n_boot, n) for n in sizes}
        return {layer: mean_scores(scores, counts) for layer, scores in self.per_prompt.items()}

    def rows(self, n_boot: int = 0, seed: int = 0) -> list[dict]:
        return causal_rows(self.means(n_boot, seed))


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
