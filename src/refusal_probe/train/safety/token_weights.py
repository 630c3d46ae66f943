"""Token weighting: each answer token's loss times a safety score (prompt tokens carry no loss and stay so).

Built-in score, from the base refusal direction r at its layer L:

    w_t = 1 - alpha * max(0, cos(h_{t-1}, r))

h_{t-1} is the BASE model's resid_pre at layer L at the position that predicts answer token t, computed once before
training. Why: the refusal direction is where the model represents "this should be refused". An answer token whose
predicting state already points along r is one where the base is in a refusal-like state; fitting the task target
there teaches the model to produce ordinary output from a refusal-like state, the update that most directly erodes
the refusal behaviour (benign data whose representations resemble harmful data is the benign data that hurts safety
most, He et al. 2024). Such tokens are down-weighted; tokens orthogonal to r or pointing away from it keep weight 1.
The weight is bounded in [1 - alpha, 1]: no token is dropped, none is amplified, so the task loss keeps its scale.

The weighted loss is sum_t w_t * CE_t / (number of answer tokens): the normaliser is the token count, not the sum of
weights, so a weight below 1 lowers that token's pull instead of being renormalised away.

A user file replaces the built-in score: JSONL, one line per weighted example, {"index": i, "weights": [w_1, ...]}
with one finite weight >= 0 per answer token of training example i (in the order training examples are built);
examples without a line keep weight 1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from refusal_probe.core.errors import UserError
from refusal_probe.core.io import read_jsonl


def builtin_weight(cos: torch.Tensor, alpha: float) -> torch.Tensor:
    return 1.0 - alpha * cos.clamp(min=0.0)


def target_positions(labels: list[int]) -> list[int]:
    """Positions t >= 1 whose token is a loss target (labels[t] != -100)."""
    return [t for t in range(1, len(labels)) if labels[t] != -100]


def weighted_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, num_items: Any = None
) -> torch.Tensor:
    """sum over target tokens of w_t * CE_t / num_items (default: the number of target tokens).

    ``labels`` and ``weights`` are aligned with the input (label t is predicted by logits t-1); -100 is no target.
    """
    shift_logits = logits[:, :-1].float()
    target = labels[:, 1:]
    w = weights[:, 1:].to(shift_logits.device, torch.float32)
    ce = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        target.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).reshape(target.shape)
    mask = target != -100
    n = mask.sum() if num_items is None else num_items
    return (ce * w * mask).sum() / torch.as_tensor(n, device=ce.device).clamp(min=1)


def read_token_weights(path: str | Path, flag: str = "--token-weights") -> dict[int, list[float]]:
    """{example index: weights} from a JSONL file; every line checked, one line names the first fault."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f'{flag} {path}: no such file; pass a JSONL file of {{"index", "weights"}} lines')
    out: dict[int, list[float]] = {}
    for number, row in read_jsonl(path, f"{flag} {path}"):
        index = row.get("index") if isinstance(row, dict) else None
        weights = row.get("weights") if isinstance(row, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise UserError(f'{flag} {path}: line {number} needs "index", a training example number >= 0')
        if not isinstance(weights, list) or not weights:
            raise UserError(f'{flag} {path}: line {number} needs "weights", a non-empty list of numbers')
        bad = [
            w
            for w in weights
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0
        ]
        if bad:
            raise UserError(
                f"{flag} {path}: line {number} has weight {bad[0]!r}; weights are finite numbers >= 0"
            )
        if index in out:
            raise UserError(f"{flag} {path}: line {number} repeats example {index}; one line per example")
        out[index] = [float(w) for w in weights]
    if not out:
        raise UserError(f"{flag} {path}: holds no weight lines; add at least one")
    return out


def full_weights(labels: list[int], answer_weights: list[float] | None) -> list[float]:
    """Weights aligned with the sequence: 1.0 on every non-target position, ``answer_weights`` on the targets."""
    out = [1.0] * len(labels)
    if answer_weights is None:
        return out
    for t, w in zip(target_positions(labels), answer_weights, strict=True):
        out[t] = w
    return out


@torch.no_grad()
def builtin_answer_weights(
    model, input_ids: list[int], labels: list[int], direction, alpha: float
) -> list[float]:
    """w_t for every target token of one sequence, from the base's resid_pre at the direction's layer."""
    from refusal_probe.core.batching import model_device
    from refusal_probe.train.safety.preservation import resid_pre

    ids = torch.tensor([input_ids])
    h = resid_pre(model, ids, torch.ones_like(ids), direction.layer)[0].float()  # [T, d]
    pos = target_positions(labels)
    states = h[[t - 1 for t in pos]]
    unit = direction.unit.to(model_device(model), torch.float32)
    cos = torch.nn.functional.cosine_similarity(states, unit[None, :], dim=-1)
    return [float(w) for w in builtin_weight(cos, alpha)]


class TokenWeights:
    """Weights by token sequence: the trainer shuffles and pads, so a batch row is found by its own input ids."""

    def __init__(self, by_ids: dict[tuple[int, ...], list[float]], source: str, stats: dict[str, Any]):
        self.by_ids, self.source, self.stats = by_ids, source, stats

    def batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] weights for a right-padded batch (1.0 on padding and prompt positions)."""
        out = torch.ones(input_ids.shape, dtype=torch.float32)
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            key = tuple(input_ids[b][keep].tolist())
            w = self.by_ids.get(key)
            if w is None:
                continue
            cols = keep.nonzero().flatten().cpu()
            out[b, cols] = torch.tensor(w[: len(cols)])
        return out

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, **self.stats}


def _row_labels(row: dict, ids: list[int]) -> list[int]:
    """The row's loss targets as TRL tokenised them: its labels, else its completion mask, else every token."""
    if row.get("labels") is not None:
        return list(row["labels"])
    mask = row.get("completion_mask") or [1] * len(ids)
    return [t if m else -100 for t, m in zip(ids, mask, strict=True)]


def build_token_weights(config, model, dataset, direction) -> TokenWeights:
    """Weights for every row of the trainer's tokenised dataset (input_ids and labels or completion_mask)."""
    user = read_token_weights(config.token_weights) if config.token_weights else None
    if user is not None:
        beyond = [i for i in user if i >= len(dataset)]
        if beyond:
            raise UserError(
                f"--token-weights {config.token_weights}: example {beyond[0]} does not exist; training has "
                f"{len(dataset)} examples (0..{len(dataset) - 1})"
            )
    by_ids: dict[tuple[int, ...], list[float]] = {}
    all_w: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for i, row in enumerate(dataset):
            ids = list(row["input_ids"])
            labels = _row_labels(row, ids)
            n_targets = len(target_positions(labels))
            if user is not None:
                w = user.get(i)
                if w is not None and len(w) != n_targets:
                    raise UserError(
                        f"--token-weights {config.token_weights}: example {i} has {n_targets} answer tokens but "
                        f"{len(w)} weights; give one weight per answer token"
                    )
            else:
                w = builtin_answer_weights(model, ids, labels, direction, config.token_weight_alpha)
            if w is not None:
                all_w.extend(w)
            by_ids[tuple(ids)] = full_weights(labels, w)
    finally:
        model.train(was_training)
    stats = {
        "examples": len(by_ids),
        "weighted_tokens": len(all_w),
        "mean_weight": sum(all_w) / len(all_w) if all_w else 1.0,
        "min_weight": min(all_w) if all_w else 1.0,
        "alpha": None if user is not None else config.token_weight_alpha,
    }
    return TokenWeights(by_ids, str(config.token_weights) if user is not None else "builtin", stats)
