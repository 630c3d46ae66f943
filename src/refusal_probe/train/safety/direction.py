"""The base model's refusal direction for training: the one narrow function through which train uses probe.

It is read, never computed here: choosing a direction costs about 30 min on a CPU for a 0.5B model, which a
training command must not spend silently. Sources, in order: --refusal-direction DIR (a folder written by
`refusal-probe directions`), else the shared direction cache's entry for the base under the default `directions`
settings (either search), else a one-line error saying how to get one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from refusal_probe.core.errors import UserError

if TYPE_CHECKING:
    from refusal_probe.train.config import TrainConfig


@dataclass
class RefusalDirection:
    layer: int  # the block whose input (resid_pre) the direction was read at
    unit: torch.Tensor  # float32 [d_model], norm 1
    source: str  # the folder it was read from
    position: int = -1  # post-instruction position offset it was chosen at

    def to_json(self) -> dict:
        return {"layer": self.layer, "position": self.position, "source": self.source}


def refusal_direction(config: TrainConfig, base_dir: Path) -> RefusalDirection:
    """The base's refusal direction, checked against its hidden size and number of layers."""
    from refusal_probe.probe.direction_result import DirectionResult

    if config.refusal_direction:
        folder = Path(config.refusal_direction).expanduser()
        if not folder.is_dir():
            raise UserError(
                f"--refusal-direction {config.refusal_direction}: no such folder; pass the --out folder "
                "of `refusal-probe directions`"
            )
        result = DirectionResult.load(folder)
        source = str(folder)
    else:
        found = _cached(base_dir)
        if found is None:
            raise UserError(
                f"{config.model}: no refusal direction for this base; run `refusal-probe directions "
                f"{config.model}` first or pass --refusal-direction DIR"
            )
        result, source = found
    d_model, n_layers = _shape(base_dir)
    unit = result.unit.to(torch.float32)
    if unit.ndim != 1 or (d_model is not None and unit.shape[0] != d_model):
        raise UserError(
            f"{source}: the refusal direction has {tuple(unit.shape)} values but {config.model} has hidden size "
            f"{d_model}; it belongs to another model (--refusal-direction)"
        )
    if not torch.isfinite(unit).all():
        raise UserError(f"{source}: the refusal direction is not finite (--refusal-direction)")
    if n_layers is not None and not 0 <= result.layer < n_layers:
        raise UserError(
            f"{source}: direction layer {result.layer} is outside {config.model}'s {n_layers} layers "
            "(--refusal-direction)"
        )
    return RefusalDirection(int(result.layer), unit.contiguous(), source, int(result.position))


def _shape(base_dir: Path) -> tuple[int | None, int | None]:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base_dir)
    cfg = getattr(cfg, "text_config", None) or cfg
    d = getattr(cfg, "hidden_size", None)
    n = getattr(cfg, "num_hidden_layers", None)
    return (int(d) if d is not None else None, int(n) if n is not None else None)


def _cached(base_dir: Path):
    """(DirectionResult, entry folder) from the shared cache under the default `directions` settings, or None."""
    from refusal_probe.models.source import load_tokenizer
    from refusal_probe.probe import direction_cache
    from refusal_probe.probe.prompts import prompt_sets
    from refusal_probe.probe.refusal_tokens import refusal_token_ids
    from refusal_probe.probe.settings import DirectionsSettings

    s = DirectionsSettings()
    try:
        sets = prompt_sets(s.n_extract(), s.n_val, s.seed, s.harmful, s.harmless, n_flag=s.N_FLAG)
        ids = refusal_token_ids(load_tokenizer(base_dir))
    except (UserError, OSError, ValueError):
        return None
    for search in ("full", "coarse"):
        key = direction_cache.selection_key(
            [base_dir],
            sets.prompts,
            ids,
            s.rules(),
            layer=None,
            position=None,
            search=search,
            dtype=s.dtype,
            quant=None,
            backend=s.backend,
        )
        result = direction_cache.load(key)
        if result is not None:
            return direction_cache.rechoose(result, None, None), str(direction_cache.entry(key))
    return None


def harmful_projection(model, tokenizer, prompts: list[str], direction: RefusalDirection) -> float:
    """Mean projection on the unit direction of the prompts' resid_pre at the direction's layer, last
    post-instruction token: the safety monitor's cheap signal (one forward pass per batch, no generation).

    The model is put in eval mode (no dropout) for the measurement and returned to the mode it was in."""
    from refusal_probe.probe.activations import capture

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            acts = capture(model, tokenizer, prompts, progress=False, desc="safety monitor")
    finally:
        model.train(was_training)
    mean = acts.mean[direction.layer, acts.index(-1)].to(torch.float64)
    return float(mean @ direction.unit.to(torch.float64))
