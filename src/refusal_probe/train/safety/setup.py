"""Wiring the weight-space options into a run: which need the refusal direction (read before any model loads),
and the callbacks and freezing applied to a built trainer, with what each did recorded under run.json "safety"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from refusal_probe.models.manifest import RunManifest
from refusal_probe.train.config import KeepOptimizer, TrainConfig
from refusal_probe.train.safety.direction import RefusalDirection, harmful_projection, refusal_direction
from refusal_probe.train.safety.ema import EmaCallback
from refusal_probe.train.safety.freeze import AUTO, auto_layers, freeze_blocks, parse_layer_spec
from refusal_probe.train.safety.monitor import SafetyMonitor
from refusal_probe.train.safety.project import ProjectOffRefusal


def needs_direction(config: TrainConfig) -> bool:
    auto = config.freeze_layers is not None and parse_layer_spec(config.freeze_layers) == AUTO
    return auto or config.project_off_refusal or config.safety_monitor


def direction_for(config: TrainConfig, base_dir: Path) -> RefusalDirection | None:
    """The base's refusal direction when an option needs it (a missing one is refused before training starts)."""
    return refusal_direction(config, base_dir) if needs_direction(config) else None


class _Record(TrainerCallback):
    """Keep run.json "safety" current before each save (ManifestWriter writes it) and at the end."""

    def __init__(
        self, manifest: RunManifest, monitor: SafetyMonitor | None, project: ProjectOffRefusal | None
    ):
        self.manifest, self.monitor, self.project = manifest, monitor, project

    def _update(self) -> None:
        if self.monitor is not None:
            self.manifest.safety["monitor"] = self.monitor.record()
        if self.project is not None:
            entry = self.manifest.safety["project_off_refusal"]
            entry["modules"] = list(self.project.modules)
            entry["max_abs_component"] = self.project.max_component()

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._update()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._update()
        if self.monitor is not None:
            m = self.manifest.safety["monitor"]
            print(
                f"safety monitor: {m['monitor_s']:.1f} s of {m['train_s']:.1f} s of training "
                f"({100 * (m['monitor_fraction'] or 0):.1f}%), {m['rollbacks']} rollback(s)"
            )


def _keyword_signal(config: TrainConfig, tok: Any) -> tuple[Any, dict[str, Any]]:
    """The monitor's optional keyword-refusal signal (None when --monitor-keyword-prompts is 0) and its record."""
    if not config.monitor_keyword_prompts:
        return None, {}
    from refusal_probe import data
    from refusal_probe.evaluate.judge import get_judge
    from refusal_probe.train.safety.keyword_signal import JUDGE, keyword_refusal

    prompts = data.harmful_val()[: config.monitor_keyword_prompts]
    judge, n_tokens = get_judge(JUDGE), config.monitor_max_new_tokens
    info = {
        "keyword_prompts": len(prompts),
        "keyword_max_new_tokens": n_tokens,
        "keyword_judge": judge.signature,
    }
    return (lambda model: keyword_refusal(model, tok, prompts, judge, n_tokens)), info


def attach(
    config: TrainConfig,
    trainer: Any,
    tok: Any,
    direction: RefusalDirection | None,
    manifest: RunManifest,
    resume: Path | None,
    previous: RunManifest | None = None,
) -> None:
    """Freeze blocks and add the callbacks, in the order the mathematics needs: project (right after the optimizer
    step), then monitor (may roll back), then EMA (averages what training keeps), then the record."""
    safety: dict[str, Any] = {}
    if direction is not None:
        safety["refusal_direction"] = direction.to_json()
    if config.freeze_layers is not None:
        spec = parse_layer_spec(config.freeze_layers)
        from refusal_probe.models.handle import decoder_layers

        n_layers = len(decoder_layers(trainer.model))
        if spec == AUTO:
            assert direction is not None
            layers = auto_layers(direction.layer, config.freeze_neighbourhood, n_layers)
            why = (
                f"auto: the refusal direction's layer {direction.layer} (from {direction.source}) "
                f"+- {config.freeze_neighbourhood}"
            )
        else:
            assert isinstance(spec, list)
            layers, why = spec, f"--freeze-layers {config.freeze_layers}"
        safety["freeze_layers"] = {**freeze_blocks(trainer.model, layers), "why": why}
    project = monitor = None
    if config.project_off_refusal:
        assert direction is not None
        project = ProjectOffRefusal(direction.unit, lora=config.uses_lora)
        trainer.add_callback(project)
        what = "LoRA B <- (I - r r^T) B" if config.uses_lora else "W <- W_base + (I - r r^T)(W - W_base)"
        safety["project_off_refusal"] = {"after_every_step": what, "max_abs_component": None}
    ema = None
    if config.ema_decay is not None:
        ema = EmaCallback(config.ema_decay, resume, prune=config.keep_optimizer == KeepOptimizer.RESUME)
    if config.safety_monitor:
        assert direction is not None
        from refusal_probe import data

        prompts = data.harmful_val()[: config.monitor_prompts]
        keyword, keyword_info = _keyword_signal(config, tok)
        monitor = SafetyMonitor(
            lambda model: harmful_projection(model, tok, prompts, direction),
            config.monitor_every,
            config.monitor_tolerance,
            config.monitor_lr_factor,
            extra=[ema] if ema is not None else [],
            previous=previous.safety.get("monitor") if previous is not None and resume is not None else None,
            keyword=keyword,
            keyword_info=keyword_info,
        )
        trainer.add_callback(monitor)
    if ema is not None:
        trainer.add_callback(ema)
        safety["ema"] = {
            "decay": config.ema_decay,
            "checkpoints_hold": "the EMA-averaged trainable weights (raw ones for resuming: ema_state.pt)",
            "averaged": "adapter parameters" if config.uses_lora else "trainable parameters",
        }
    if project is not None or monitor is not None:
        trainer.add_callback(_Record(manifest, monitor, project))
    manifest.safety.update(safety)
