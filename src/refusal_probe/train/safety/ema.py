"""--ema-decay: an exponential moving average of the trainable parameters in weight space (Kim et al. 2025).

After every optimizer step theta_ema <- D * theta_ema + (1 - D) * theta, on float32 shadow copies of the trainable
parameters only (for LoRA the adapter's). A checkpoint holds the AVERAGED weights: the shadow is swapped into the
model just before the Trainer saves and the raw weights are put back right after, so training continues on the raw
trajectory. The newest checkpoint also gets ``ema_state.pt`` (raw trainable weights and the shadow), so a resumed run
goes on exactly where it stopped instead of training on from the averaged weights; like the optimizer state it is
deleted from older checkpoints (with --keep-optimizer resume) and when the run completes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

EMA_STATE = "ema_state.pt"


def ema_update(shadow: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    """In place: shadow[k] <- decay * shadow[k] + (1 - decay) * params[k] (in the shadow's dtype)."""
    for name, s in shadow.items():
        s.mul_(decay).add_(params[name].detach().to(s.dtype), alpha=1.0 - decay)


def trainable(model: Any, optimizer: Any = None) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimizer updates (by name); without an optimizer, those that require grad.

    Taken once at the start of training: PEFT's set_adapter (TRL's DPO calls it) sets requires_grad again on a
    frozen block's adapter, which the optimizer, built before, still leaves alone."""
    if optimizer is not None:
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return {n: p for n, p in model.named_parameters() if id(p) in ids}
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class EmaCallback(TrainerCallback):
    """Keeps the shadow; swaps it in around each save. Add it after the callback that requests saves."""

    def __init__(self, decay: float, resume: Path | None = None, prune: bool = True):
        self.decay = decay
        self.resume = resume
        self.prune = (
            prune  # keep ema_state.pt in the newest checkpoint only (as --keep-optimizer resume does)
        )
        self.shadow: dict[str, torch.Tensor] = {}
        self._raw: dict[str, torch.Tensor] | None = None
        self.params: dict[str, torch.nn.Parameter] = {}

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.params = params = trainable(model, optimizer)
        self.shadow = {n: p.detach().to(torch.float32).clone() for n, p in params.items()}
        saved = self.resume / EMA_STATE if self.resume is not None else None
        if saved is not None and saved.is_file():
            blob = torch.load(saved, map_location="cpu", weights_only=True)
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(blob["raw"][n].to(p.dtype))
                    self.shadow[n].copy_(blob["shadow"][n])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        ema_update(self.shadow, self.params, self.decay)
        if control.should_save:
            self._swap_in()
            if (
                state.is_world_process_zero
            ):  # written first: a checkpoint never lacks it (the Trainer adds the rest)
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                folder.mkdir(parents=True, exist_ok=True)
                assert self._raw is not None
                torch.save({"raw": self._raw, "shadow": self.shadow}, folder / EMA_STATE)
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if self._raw is not None:
            self._swap_out()
        if self.prune and state.is_world_process_zero:
            for old in Path(args.output_dir).glob(f"checkpoint-*/{EMA_STATE}"):
                if old.parent.name != f"checkpoint-{state.global_step}":
                    old.unlink(missing_ok=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.prune and state.is_world_process_zero:  # a complete run is never resumed
            for old in Path(args.output_dir).glob(f"checkpoint-*/{EMA_STATE}"):
                old.unlink(missing_ok=True)

    def _swap_in(self) -> None:
        self._raw = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n].to(p.dtype))

    def _swap_out(self) -> None:
        assert self._raw is not None
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self._raw[n])
        self._raw = None
