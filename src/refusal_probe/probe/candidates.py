"""The rules that filter and choose among refusal-direction candidates (Arditi et al. 2024), as pure functions.

Every candidate is scored on held-out prompts, from the next-token distribution at the last prompt position only:
- ``ablation_score``: mean refusal score on harmful prompts with the candidate projected out everywhere (lower is better:
  the direction is necessary for refusal);
- ``steering_score``: mean refusal score on harmless prompts with the candidate added at its own layer (must rise above
  ``induce_threshold``: the direction is sufficient for refusal);
- ``kl``: mean KL(base || ablated) on harmless prompts (small: removing it leaves ordinary behaviour alone).
Candidates from the last layers, with a large KL or that do not induce refusal are filtered; the survivor with the lowest
ablation score is chosen. Model running lives in :mod:`refusal_probe.probe.scoring`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from refusal_probe.core.errors import UserError
from refusal_probe.probe.settings import DEFAULT_RULES, SelectionRules

# Reasons a candidate is filtered (the ``filtered_reason`` column joins them with ";").
LATE_LAYER, HIGH_KL, NO_INDUCTION, NOT_FINITE, NOT_SCORED = "layer", "kl", "steering", "nan", "not scored"
ZERO = "zero"  # the candidate is the zero vector (layer 0: every prompt has the same template tokens there)

SCORE_COLUMNS = (
    "layer",
    "position",
    "direction_norm",
    "harmful_baseline",
    "harmless_baseline",
    "ablation_score",
    "steering_score",
    "kl",
    "filtered_reason",
)


def refusal_score(logits_last: torch.Tensor, refusal_ids: Sequence[int], eps: float = 1e-8) -> torch.Tensor:
    """Log-odds ``log(p + eps) - log(1 - p + eps)`` of the summed probability p of the refusal tokens, per row.

    Computed in float64 from log-sum-exps (1 - p is the summed probability of the other tokens, not a subtraction),
    so it stays exact when p is close to 0 or 1. ``eps`` (Arditi et al. use 1e-8) bounds the score at about +-18.4,
    so one prompt with a vanishing probability cannot dominate a mean; ``eps=0`` gives the exact log-odds.
    """
    logits = torch.as_tensor(logits_last).to(torch.float64)
    if logits.ndim != 2:
        raise ValueError(f"expected logits [n, vocab], got shape {tuple(logits.shape)}")
    ids = torch.as_tensor(list(refusal_ids), dtype=torch.long)
    if ids.numel() == 0:
        raise UserError("no refusal token ids to score: pass at least one refusal phrase")
    vocab = logits.shape[-1]
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise UserError(f"refusal token ids {ids.tolist()} fall outside the vocabulary of size {vocab}")
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[ids] = True
    total = torch.logsumexp(logits, dim=-1)
    log_p = torch.logsumexp(logits[:, mask], dim=-1) - total
    log_q = (
        torch.logsumexp(logits[:, ~mask], dim=-1) - total
        if bool((~mask).any())
        else torch.full_like(total, -math.inf)
    )
    if eps > 0:
        log_eps = torch.tensor(math.log(eps), dtype=torch.float64)
        log_p, log_q = torch.logaddexp(log_p, log_eps), torch.logaddexp(log_q, log_eps)
    return log_p - log_q


def kl_last(base_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || new) in nats between the next-token distributions of each row, in float64."""
    if base_logits.shape != new_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(base_logits.shape)} vs {tuple(new_logits.shape)}")
    log_p = torch.log_softmax(base_logits.to(torch.float64), dim=-1)
    log_q = torch.log_softmax(new_logits.to(torch.float64), dim=-1)
    terms = torch.where(log_p == -math.inf, torch.zeros_like(log_p), log_p.exp() * (log_p - log_q))
    return terms.sum(dim=-1).clamp_min(0.0)


def layer_cutoff(n_layers: int, max_layer_fraction: float) -> int:
    """First layer filtered as too late: ``floor(fraction * L)``, as Arditi et al. (``int(L * (1 - 0.2))``)."""
    return int(n_layers * max_layer_fraction + 1e-9)


def filter_reasons(
    df: pd.DataFrame,
    n_layers: int,
    rules: SelectionRules = DEFAULT_RULES,
) -> pd.Series:
    """Why each candidate is discarded ("" when kept): late layer, KL above threshold, addition not inducing refusal.

    A zero candidate is marked "zero", other rows without finite scores "nan", skipped ones stay "not scored".
    """
    cutoff = layer_cutoff(n_layers, rules.max_layer_fraction)
    reasons = []
    for row in df.itertuples(index=False):
        previous = str(getattr(row, "filtered_reason", "") or "")
        if NOT_SCORED in _reasons(previous):
            reasons.append(previous)
            continue
        items = []
        if row.layer >= cutoff:
            items.append(LATE_LAYER)
        values = (row.ablation_score, row.steering_score, row.kl)
        if getattr(row, "direction_norm", None) == 0:
            items.append(ZERO)
        elif any(v is None or not math.isfinite(float(v)) for v in values):
            items.append(NOT_FINITE)
        else:
            if row.kl > rules.kl_threshold:
                items.append(HIGH_KL)
            if row.steering_score < rules.induce_threshold:
                items.append(NO_INDUCTION)
        reasons.append(";".join(items))
    return pd.Series(reasons, index=df.index, dtype=object, name="filtered_reason")


def _reasons(value: Any) -> set[str]:
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    return {r for r in text.split(";") if r}


def choose(df: pd.DataFrame) -> pd.Series:
    """The kept candidate with the lowest ablation score, as a row with an added ``warning`` field ("" if none).

    When every candidate is filtered, the filters are relaxed one at a time, most demanding first, and ``warning`` says
    which was dropped (never a silent fallback): first the steering threshold, keeping only candidates whose addition
    still raises the harmless refusal score above its baseline (small models such as Qwen2.5-0.5B refuse a quarter of
    harmless prompts under addition: a real effect that stays below Arditi's "log-odds > 0" bar); then the KL bound;
    then the layer bound.
    """
    if df.empty:
        raise UserError("no direction candidates to choose from")
    reasons = df["filtered_reason"].map(_reasons)
    finite = df["ablation_score"].map(lambda v: v is not None and math.isfinite(float(v)))
    raises = df["steering_score"].astype(float) > df["harmless_baseline"].astype(float)
    tiers = (
        (reasons.map(len) == 0) & finite,
        reasons.map(lambda r: not r & {LATE_LAYER, NOT_SCORED, NOT_FINITE, ZERO, HIGH_KL}) & finite & raises,
        reasons.map(lambda r: not r & {LATE_LAYER, NOT_SCORED, NOT_FINITE, ZERO}) & finite,
        finite,
    )
    messages = (
        "",
        "no candidate passed the steering threshold; chose the lowest ablation score among allowed layers within "
        "the KL bound whose addition still raises harmless refusal above baseline",
        "every candidate was filtered (KL or steering thresholds); chose the lowest ablation score among the "
        "allowed layers: the direction may not mediate refusal in this model",
        "every candidate was filtered, including by layer; chose the lowest ablation score overall: "
        "the direction may not mediate refusal in this model",
    )
    for mask, message in zip(tiers, messages, strict=True):
        if bool(mask.any()):
            best = df.loc[mask, "ablation_score"].astype(float).idxmin()
            row = df.loc[best].copy()
            row["warning"] = message
            return row
    raise UserError(
        "no direction candidate has a finite ablation score; check the model's outputs (NaN logits?)"
    )
