"""Trainer callbacks: checkpoints at fractions of training, a run manifest kept current, optimizer-state pruning.

The study saved at 25/50/75/100% of one epoch (save_steps=0.25). Here the steps are computed once from the total the
Trainer plans (state.max_steps), so they are the same on a resumed run, and the manifest records step -> fraction.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback

from refusal_probe.models.manifest import RunManifest

CHECKPOINT_PREFIX = "checkpoint-"


def checkpoint_steps(fractions: Sequence[float], total_steps: int) -> dict[int, float]:
    """{step: fraction} with step = round-half-up(fraction * total), at least 1.

    When two fractions land on the same step (very short runs) the step keeps the larger fraction.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    out: dict[int, float] = {}
    for f in sorted(set(float(x) for x in fractions)):
        step = min(total_steps, max(1, math.floor(f * total_steps + 0.5)))
        out[step] = f
    return dict(sorted(out.items()))


class FractionCheckpoints(TrainerCallback):
    """Ask the Trainer to save at the configured fractions of its total steps (save_strategy stays "no")."""

    def __init__(self, fractions: Sequence[float]):
        self.fractions = list(fractions)
        self.steps: dict[int, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = checkpoint_steps(self.fractions, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True
        return control


class ManifestWriter(TrainerCallback):
    """Keep ``run.json`` current: planned step -> fraction map at the start, rewritten after every checkpoint.

    The manifest is first written with the first checkpoint, so a run folder never holds a manifest without weights.
    """

    def __init__(
        self,
        manifest: RunManifest,
        run_dir: Path,
        fractions: Sequence[float],
        previous_wall_s: float = 0.0,
        started: float | None = None,
    ):
        self.manifest = manifest
        self.run_dir = Path(run_dir)
        self.fractions = list(fractions)
        self.previous_wall_s = previous_wall_s
        self.started = time.monotonic() if started is None else started  # a time.monotonic() value

    def wall_time(self) -> float:
        return round(self.previous_wall_s + time.monotonic() - self.started, 3)

    def on_train_begin(self, args, state, control, **kwargs):
        self.manifest.total_steps = int(state.max_steps)
        self.manifest.checkpoints = checkpoint_steps(self.fractions, state.max_steps)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.manifest.wall_time_s = self.wall_time()
            self.manifest.save(self.run_dir)


class PruneOptimizerState(TrainerCallback):
    """After each save, delete optimizer.pt from older checkpoints: only the newest is needed to resume, and for
    full fine-tuning the AdamW state is twice the model's size per checkpoint."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        for d in checkpoint_dirs(self.run_dir):
            if checkpoint_step(d) < state.global_step:
                (d / "optimizer.pt").unlink(missing_ok=True)


def checkpoint_step(d: Path) -> int:
    return int(d.name[len(CHECKPOINT_PREFIX) :])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """checkpoint-<step>/ folders of a run, by step."""
    if not run_dir.is_dir():
        return []
    dirs = [
        p
        for p in run_dir.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(dirs, key=checkpoint_step)


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint the Trainer finished writing (trainer_state.json is written last)."""
    done = [d for d in checkpoint_dirs(run_dir) if (d / "trainer_state.json").is_file()]
    return done[-1] if done else None
