"""The life of a run folder, decided before any model is loaded: new, resumed or complete (skipped), or refused.

Refused: a complete or partial run whose settings differ from the new ones (execution-only settings may differ), and a
run folder that would land inside another run's, checkpoint's or model's folder (those are never written). The base is
recorded so that the tree reads from any working directory. When a run completes, resume-only state is pruned.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.models import embedded
from refusal_probe.models.manifest import MANIFEST, RunManifest
from refusal_probe.models.source import is_adapter_dir, is_model_dir, looks_local
from refusal_probe.models.tree import CHECKPOINT_DIR
from refusal_probe.train.callbacks import checkpoint_dirs, last_complete_checkpoint
from refusal_probe.train.config import EXECUTION_ONLY, TrainConfig

NEW, RESUME, COMPLETE = "new", "resume", "complete"


def run_status(run_dir: Path) -> tuple[str, Path | None]:
    """("complete", None) | ("resume", newest finished checkpoint) | ("new", None)."""
    run_dir = Path(run_dir)
    if (run_dir / MANIFEST).is_file():
        manifest = RunManifest.load(run_dir)
        if manifest.complete:
            return COMPLETE, None
    last = last_complete_checkpoint(run_dir)
    return (RESUME, last) if last is not None else (NEW, None)


def hyperparameters(config: TrainConfig) -> dict[str, Any]:
    """Every setting, flat, plus what follows from them (effective batch, 4-bit base: what eval and analyze read back
    through ``QuantSpec.from_hyperparameters``)."""
    out = config.to_dict()
    out["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate/torchrun
    out["effective_batch_size"] = config.effective_batch_size * out["world_size"]
    out["load_in_4bit"] = config.method == "qlora"
    out["lora_target_modules"] = config.lora_modules() if config.uses_lora else None
    return out


def base_record(spec: str) -> str:
    """The base as run.json records it: a local one as an absolute path (the tree is then read from any working
    directory), an embedded name or hub id as given."""
    text = str(spec)
    if text in embedded.EMBEDDED:
        return text
    path = Path(text).expanduser()
    if looks_local(text) or path.exists():
        return str(path.resolve())
    return text


def settings_diff(previous: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every recorded setting that changes what a run learns; execution-only ones may differ.

    A key the previous run did not record (an older run.json) is not compared: its value there is unknown.
    """
    return [
        (k, previous[k], current[k])
        for k in sorted(set(previous) & set(current))
        if k not in EXECUTION_ONLY and previous[k] != current[k]
    ]


def describe_diff(diffs: list[tuple[str, Any, Any]]) -> str:
    """'learning_rate 0.0001 -> 5e-05, seed 42 -> 1'."""
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in diffs)


@dataclass(frozen=True)
class RunPlan:
    """What ``train`` will do with a run folder, decided without loading anything."""

    run_dir: Path
    status: str  # NEW | RESUME | COMPLETE
    resume: Path | None
    previous: RunManifest | None
    hyperparameters: dict[str, Any]
    base_model: str  # base_record(config.model)


def plan_run(config: TrainConfig, out_dir: str | Path) -> RunPlan:
    """Refuse a run folder inside another run/checkpoint/model folder, or a run with changed settings; else the plan.

    ``config`` has its hardware resolved (``resolve_hardware``); nothing is written here.
    """
    out_dir = Path(out_dir)
    run_dir = out_dir / config.name
    check_location(out_dir, run_dir)
    status, resume = run_status(run_dir)
    hp = hyperparameters(config)
    base = base_record(config.model)
    previous = RunManifest.load(run_dir) if (run_dir / MANIFEST).is_file() else None
    if previous is not None:
        old = {**previous.hyperparameters}
        if previous.base_model and "model" in old:
            old["model"] = previous.base_model
        diffs = settings_diff(old, {**hp, "model": base})
        if diffs and status == COMPLETE:
            raise UserError(
                f"{run_dir}: a complete run with other settings is there ({describe_diff(diffs)}); pass another "
                "--run-name (or --out), or remove that folder yourself to retrain it"
            )
        if diffs:
            raise UserError(
                f"{run_dir}: this run was started with other settings ({describe_diff(diffs)}); pass another "
                "--run-name (or --out), or remove that folder yourself to start over"
            )
    return RunPlan(run_dir, status, resume, previous, hp, base)


def check_location(out_dir: Path, run_dir: Path) -> None:
    """A run folder is never made inside a run, checkpoint or model folder (nor any folder below one)."""
    out_dir = Path(out_dir).expanduser()
    resolved = out_dir.resolve()
    for folder in (resolved, *resolved.parents):
        why = _training_output(folder)
        if why:
            raise UserError(
                f"--out {out_dir}: the run folder would lie inside {folder}, which {why} and is never written; "
                f"pass --out DIR outside it (e.g. {folder.parent})"
            )
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        why = _model_at_root(run_dir)
        if why:
            raise UserError(
                f"{run_dir}: {why}, not a run folder of refusal-probe train; pass another --run-name or --out "
                "DIR (never written into)"
            )


def _training_output(folder: Path) -> str | None:
    """Why ``folder`` belongs to a training run or a model (so that nothing may be written below it), or None."""
    if not folder.is_dir():
        return None
    if (folder / MANIFEST).is_file():
        return f"holds {MANIFEST} (a training run)"
    try:
        if any(CHECKPOINT_DIR.match(p.name) and p.is_dir() and _model_at_root(p) for p in folder.iterdir()):
            return "holds checkpoint folders (a training run)"
    except OSError:
        return None
    return _model_at_root(folder)


def _model_at_root(folder: Path) -> str | None:
    if (folder / "trainer_state.json").is_file():
        return "holds trainer_state.json (a checkpoint)"
    if is_adapter_dir(folder):
        return "holds an adapter (adapter_config.json)"
    if is_model_dir(folder):
        return "holds a model (config.json and weights)"
    return None


def drop_unfinished_checkpoints(run_dir: Path) -> None:
    """Remove checkpoint folders the Trainer did not finish (no trainer_state.json): they would be re-saved anyway,
    and readers of the tree would trip on half-written weights."""
    for d in checkpoint_dirs(run_dir):
        if not (d / "trainer_state.json").is_file():
            print(f"{d}: unfinished checkpoint removed")
            shutil.rmtree(d, ignore_errors=True)  # several processes may race here under accelerate


def missing_checkpoints(manifest: RunManifest, run_dir: Path) -> list[int]:
    return [s for s in manifest.checkpoints if not (run_dir / f"checkpoint-{s}").is_dir()]


def prune_resume_state(run_dir: Path) -> None:
    """A complete run is never resumed: its optimizer state (twice a full model's size) goes."""
    for d in checkpoint_dirs(run_dir):
        (d / "optimizer.pt").unlink(missing_ok=True)
