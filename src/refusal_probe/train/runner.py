"""``train(config, out_dir)``: one run, start to finish. Every refusal (bad settings, a run folder inside another
run's, changed settings of a complete or partial run, an unwritable --out) comes before any model is loaded.

Writes ``<out>/<run>/checkpoint-<step>/`` (HF Trainer layout: full weights, or a PEFT adapter) at the configured
fractions of training, and ``<out>/<run>/run.json``. A complete run with the same settings is skipped; an
interrupted one resumes from its newest finished checkpoint.
"""

from __future__ import annotations

import gc
import platform
import time
from pathlib import Path

from refusal_probe.core.io import prepare_output
from refusal_probe.models.manifest import RunManifest
from refusal_probe.train import lifecycle
from refusal_probe.train.base import base_dir_for, base_revision, load_for_training, resolve_hardware
from refusal_probe.train.callbacks import FractionCheckpoints, ManifestWriter, PruneOptimizerState
from refusal_probe.train.config import KeepOptimizer, TrainConfig
from refusal_probe.train.examples import training_examples
from refusal_probe.train.safety import setup as safety_setup
from refusal_probe.train.safety.gradients import (
    build_gradient_options,
    check_gradient_inputs,
    wants_gradient_options,
)
from refusal_probe.train.trainer import build_trainer


def prepare(config: TrainConfig, out_dir: str | Path) -> tuple[TrainConfig, lifecycle.RunPlan]:
    """Validate, pin the hardware and decide the run folder's fate; refuses with one line, loads nothing."""
    config = resolve_hardware(config.validate())
    return config, lifecycle.plan_run(config, out_dir)


def train(config: TrainConfig, out_dir: str | Path, callbacks: list | None = None) -> Path:
    """Train one run into ``<out_dir>/<run name>/``; return that folder. Skips a complete run, resumes a partial one.

    ``callbacks``: extra transformers TrainerCallbacks (a monitor that evaluates during training, an early stop).
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    config, plan = prepare(config, out_dir)
    run_dir = plan.run_dir
    if plan.status == lifecycle.COMPLETE:
        print(f"{run_dir}: complete, skipped")
        return run_dir
    prepare_output(out_dir, marker=False)
    base_dir = base_dir_for(config)
    lifecycle.drop_unfinished_checkpoints(run_dir)
    revision = base_revision(config.model, base_dir)
    direction = safety_setup.direction_for(config, base_dir)  # a missing direction is refused before loading
    check_gradient_inputs(config, base_dir)  # their files and direction, before loading
    model, tok = load_for_training(config, base_dir)
    examples, provenance = training_examples(config, model, tok, out_dir, revision)

    previous = plan.previous
    manifest = RunManifest(
        run=config.name,
        method=config.method,
        base_model=plan.base_model,
        base_model_spec=config.model,
        base_model_revision=revision,
        learning_rate=config.learning_rate,
        hyperparameters=plan.hyperparameters,
        data={"train": provenance},
        versions=library_versions(),
    )
    writer = ManifestWriter(
        manifest,
        run_dir,
        config.checkpoint_fractions,
        previous_wall_s=(previous.wall_time_s or 0.0) if previous else 0.0,
        started=started,
    )
    ours = [FractionCheckpoints(config.checkpoint_fractions), writer]
    if config.keep_optimizer == KeepOptimizer.RESUME:
        ours.append(PruneOptimizerState(run_dir))
    trainer = build_trainer(config, model, tok, examples, run_dir, ours + list(callbacks or []), base_dir)
    safety_setup.attach(config, trainer, tok, direction, manifest, plan.resume, previous)
    if wants_gradient_options(config):  # after freezing; on the base weights (a resume loads later)
        build_gradient_options(config, trainer, tok, run_dir, revision, base_dir, manifest)
    if plan.resume is not None:
        print(f"{run_dir}: resuming from {plan.resume.name}")
    trainer.train(resume_from_checkpoint=str(plan.resume) if plan.resume else None)

    missing = lifecycle.missing_checkpoints(manifest, run_dir)
    if missing:
        raise RuntimeError(f"{run_dir}: training ended without checkpoints at steps {missing}")
    manifest.wall_time_s = writer.wall_time()
    manifest.complete = True
    if trainer.is_world_process_zero():
        if config.keep_optimizer == KeepOptimizer.RESUME:
            lifecycle.prune_resume_state(run_dir)
        manifest.save(run_dir)
    del trainer, model
    _free_memory()
    return run_dir


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in (
        "refusal-probe",
        "torch",
        "transformers",
        "peft",
        "trl",
        "accelerate",
        "datasets",
        "bitsandbytes",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
