"""Choosing the refusal direction among the per-(layer, position) difference-of-means candidates (Arditi et al. 2024).

Every candidate is scored on held-out prompts, from the next-token distribution at the last prompt position only:
- ``ablation_score``: mean refusal score on harmful prompts with the candidate projected out everywhere (lower is better:
  the direction is necessary for refusal);
- ``steering_score``: mean refusal score on harmless prompts with the candidate added at its own layer (must rise above
  ``induce_threshold``: the direction is sufficient for refusal);
- ``kl``: mean KL(base || ablated) on harmless prompts (small: removing it leaves ordinary behaviour alone).
Candidates from the last layers, with a large KL or that do not induce refusal are filtered; the survivor with the lowest
ablation score is chosen. Every candidate's scores are written out, so the choice can be checked.

The math (refusal score, KL, filtering, choice) is pure functions over tensors and tables; model running is separate.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
from refusal_probe.core.io import atomic_write, read_json, write_json
from refusal_probe.probe import DEFAULT_SEED

FORMAT = "refusal-probe/direction/1"
CANDIDATES_CSV = "candidates.csv"
DIRECTION_JSON = "direction.json"
DIRECTIONS_ST = "directions.safetensors"

# Openers of a refusal; only the first token of each (as the model would start its answer) is scored.
DEFAULT_REFUSAL_PHRASES: tuple[str, ...] = (
    "I cannot",
    "I can't",
    "I'm sorry",
    "I am sorry",
    "I apologize",
    "Sorry",
    "As an AI",
    "Unfortunately",
    "I'm unable",
    "I will not",
    "I won't",
)

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


# ----------------------------------------------------------------------------------------------- pure scoring math


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
    *,
    max_layer_fraction: float = 0.8,
    kl_threshold: float = 0.1,
    induce_threshold: float = 0.0,
) -> pd.Series:
    """Why each candidate is discarded ("" when kept): late layer, KL above threshold, addition not inducing refusal.

    A zero candidate is marked "zero", other rows without finite scores "nan", skipped ones stay "not scored".
    """
    cutoff = layer_cutoff(n_layers, max_layer_fraction)
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
            if row.kl > kl_threshold:
                items.append(HIGH_KL)
            if row.steering_score < induce_threshold:
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


# ----------------------------------------------------------------------------------------------------- model running


def refusal_token_ids(tokenizer: Any, phrases: Sequence[str] = DEFAULT_REFUSAL_PHRASES) -> list[int]:
    """Unique ids of the first token of each phrase, tokenised as the start of an answer after the chat template."""
    from refusal_probe.core.template import format_prompts

    phrases = [p for p in phrases if p and p.strip()]
    if not phrases:
        raise UserError('no refusal phrases given: pass e.g. --refusal-tokens "I,Sorry"')
    prompt = format_prompts(tokenizer, ["Hello"])[0]

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    base = encode(prompt)
    out: list[int] = []
    for phrase in phrases:
        full = encode(prompt + phrase)
        if len(full) > len(base) and full[: len(base)] == base:
            token = full[len(base)]
        else:  # the phrase merged with the template's last token: fall back to the phrase alone
            alone = encode(phrase)
            if not alone:
                raise UserError(f"refusal phrase {phrase!r} tokenises to nothing; pass another")
            token = alone[0]
        if token not in out:
            out.append(int(token))
    return out


def parse_phrases(text: str) -> list[str]:
    """``"I,Sorry, As an AI"`` -> ``["I", "Sorry", "As an AI"]`` (the --refusal-tokens option)."""
    phrases = [p.strip() for p in text.split(",") if p.strip()]
    if not phrases:
        raise UserError(f'--refusal-tokens {text!r} names no phrase; pass e.g. "I,Sorry"')
    return phrases


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
    batch_size: int = 16,
    *,
    max_layer_fraction: float = 0.8,
    kl_threshold: float = 0.1,
    induce_threshold: float = 0.0,
    only: set[tuple[int, int]] | None = None,
    skip_late_layers: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per (layer, position) of ``candidates`` [L, P, d] with its scores and ``filtered_reason``.

    ``only``: score just these (layer, position) pairs (positions negative, -P..-1); the rest are "not scored".
    ``skip_late_layers`` (ignored with ``only``): do not score the layers the layer rule discards anyway (saves
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
    cutoff = layer_cutoff(n_layers, max_layer_fraction)
    if only is not None:
        todo = {p for p in pairs if p in only}
    else:
        todo = {p for p in pairs if not (skip_late_layers and p[0] >= cutoff)}
    rows = []
    bar = tqdm(total=len(todo), desc="scoring direction candidates", unit="cand", disable=not progress)
    try:
        for layer, pos in pairs:
            vector = candidates[layer, n_pos + pos]
            row = dict(
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
    df["filtered_reason"] = filter_reasons(
        df,
        n_layers,
        max_layer_fraction=max_layer_fraction,
        kl_threshold=kl_threshold,
        induce_threshold=induce_threshold,
    )
    return df


# --------------------------------------------------------------------------------------------------------- result


@dataclass
class DirectionResult:
    """The candidates [L, P, d], the chosen one, every candidate's scores and how they were obtained."""

    directions: torch.Tensor  # float64 [L, P, d]: mean(harmful) - mean(harmless) at resid_pre of each layer
    layer: int
    position: int  # negative offset among the post-instruction tokens, -P..-1
    direction: torch.Tensor  # float64 [d], not normalised
    scores: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)
    warning: str = ""

    @property
    def unit(self) -> torch.Tensor:
        return self.direction / torch.linalg.vector_norm(self.direction)

    @property
    def positions(self) -> list[int]:
        return list(range(-self.directions.shape[1], 0))

    @property
    def chosen(self) -> dict[str, Any]:
        """The chosen candidate's row of ``scores`` as a plain dict."""
        hit = self.scores[(self.scores["layer"] == self.layer) & (self.scores["position"] == self.position)]
        return {k: _plain(v) for k, v in hit.iloc[0].items()} if len(hit) else {}

    def save(self, out_dir: str | Path) -> Path:
        """Write candidates.csv, direction.json and directions.safetensors into ``out_dir`` (atomically each)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / CANDIDATES_CSV, lambda p: self.scores.to_csv(p, index=False))
        tensors = {
            "directions": self.directions.to(torch.float64).contiguous(),
            "direction": self.direction.to(torch.float64).contiguous(),
            "unit": self.unit.to(torch.float64).contiguous(),
        }
        meta = {"format": FORMAT, "layer": str(self.layer), "position": str(self.position)}
        atomic_write(out / DIRECTIONS_ST, lambda p: save_file(tensors, str(p), metadata=meta))
        write_json(
            out / DIRECTION_JSON,
            {
                "format": FORMAT,
                "layer": self.layer,
                "position": self.position,
                "n_layers": int(self.directions.shape[0]),
                "positions": self.positions,
                "d_model": int(self.directions.shape[2]),
                "direction_norm": float(torch.linalg.vector_norm(self.direction)),
                "chosen": self.chosen,
                "warning": self.warning,
                "settings": self.settings,
                "files": {"candidates": CANDIDATES_CSV, "tensors": DIRECTIONS_ST},
            },
        )
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> DirectionResult:
        from safetensors.torch import load_file

        out = Path(out_dir)
        missing = [n for n in (DIRECTION_JSON, CANDIDATES_CSV, DIRECTIONS_ST) if not (out / n).is_file()]
        if missing:
            raise UserError(
                f"{out}: not a directions folder (missing {', '.join(missing)}); run `refusal-probe directions`"
            )
        meta = read_json(out / DIRECTION_JSON)
        if meta.get("format") != FORMAT:
            raise UserError(
                f"{out / DIRECTION_JSON}: unknown format {meta.get('format')!r}, expected {FORMAT!r}"
            )
        tensors = load_file(str(out / DIRECTIONS_ST))
        scores = pd.read_csv(out / CANDIDATES_CSV, keep_default_na=False, na_values=[""])
        scores["filtered_reason"] = scores["filtered_reason"].fillna("").astype(str)
        return cls(
            directions=tensors["directions"],
            layer=int(meta["layer"]),
            position=int(meta["position"]),
            direction=tensors["direction"],
            scores=scores,
            settings=meta.get("settings", {}),
            warning=meta.get("warning", ""),
        )


def _plain(value: Any) -> Any:
    """numpy scalars -> Python; NaN -> None (JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sample_prompts(prompts: list[str], n: int | None, seed: int) -> list[str]:
    """``n`` prompts drawn without replacement with a fixed seed (all, in order, when n is None or >= len)."""
    if n is not None and n < 1:
        raise UserError(f"prompt count {n} must be at least 1")
    if n is None or n >= len(prompts):
        return list(prompts)
    return random.Random(seed).sample(list(prompts), n)


SEARCHES = ("full", "coarse")


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


def select_direction(
    model: Any,
    tokenizer: Any,
    harmful_train: list[str],
    harmless_train: list[str],
    harmful_val: list[str],
    harmless_val: list[str],
    *,
    n_train: int | None = 128,
    n_val: int | None = 32,
    layer: int | None = None,
    position: int | None = None,
    batch_size: int = 16,
    refusal_ids: Sequence[int] | None = None,
    max_layer_fraction: float = 0.8,
    kl_threshold: float = 0.1,
    induce_threshold: float = 0.0,
    skip_late_layers: bool = False,
    backend: str = "hooks",
    seed: int = DEFAULT_SEED,
    progress: bool = True,
    sources: dict[str, str] | None = None,
    activations: tuple[Any, Any] | None = None,
    search: str = "full",
    top_layers: int = 3,
) -> DirectionResult:
    """Difference-of-means candidates on the train prompts, scored and chosen on the held-out ones.

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

    kw = dict(batch_size=batch_size, backend=backend, progress=progress)
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
        max_layer_fraction=max_layer_fraction,
        layer_cutoff=layer_cutoff(n_layers, max_layer_fraction),
        skip_late_layers=skip_late_layers,
        kl_threshold=kl_threshold,
        induce_threshold=induce_threshold,
        refusal_ids=ids,
        refusal_tokens=[tokenizer.decode([i]) for i in ids],
        forced_layer=layer,
        forced_position=position,
        prompts={
            name: {"n": len(items), "available": len(full), "source": (sources or {}).get(name, "")}
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
        max_layer_fraction=max_layer_fraction,
        kl_threshold=kl_threshold,
        induce_threshold=induce_threshold,
        skip_late_layers=skip_late_layers,
        progress=progress,
    )
    if search == "auto":
        search = "full" if model_device(model).type == "cuda" else "coarse"
    if search not in SEARCHES:
        raise UserError(f"unknown search {search!r}: choose one of {', '.join(SEARCHES)}, auto")
    settings["search"] = search
    if only is None and search == "coarse":
        scores = coarse_to_fine(
            score, n_layers, n_pos, layer_cutoff(n_layers, max_layer_fraction), top_layers
        )
        settings["coarse_top_layers"] = top_layers
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
