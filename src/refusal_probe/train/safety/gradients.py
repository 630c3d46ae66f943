"""The gradient/loss safety options of one run, and the trainer mixin that applies them.

After the last micro-batch of an optimizer step has been backpropagated (before clipping and the optimizer), in
this order: gradient surgery replaces the accumulated task gradient by its projection off the conflicting safety
gradient; then the EWC penalty and the refusal-preservation term are backpropagated into the same gradients (once per
optimizer step, whatever the accumulation). Token weighting replaces the SFT loss of each micro-batch. Safety
forwards run in eval mode (no dropout), so the safety gradient and the projections are those of the weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from refusal_probe.train.safety.ewc import EWC
from refusal_probe.train.safety.preservation import Preservation
from refusal_probe.train.safety.safety_batch import SafetyBatch, safety_loss
from refusal_probe.train.safety.surgery import SurgeryStats, apply_surgery
from refusal_probe.train.safety.token_weights import TokenWeights, weighted_token_loss


def wants_gradient_options(config) -> bool:
    return bool(
        config.gradient_surgery or config.ewc or config.refusal_preservation or config.token_weighting
    )


@dataclass
class GradientOptions:
    """What the mixin applies; each part is None when its option is off."""

    params: dict[str, torch.nn.Parameter]
    surgery_every: int = 1
    surgery_mode: str = "global"
    batch: SafetyBatch | None = None
    surgery: SurgeryStats | None = None
    ewc: EWC | None = None
    preservation: Preservation | None = None
    token_weights: TokenWeights | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    _window: dict[str, list[float]] = field(default_factory=dict)

    def _note(self, key: str, value: float) -> None:
        self._window.setdefault(key, []).append(value)

    def _time(self, key: str, started: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + time.monotonic() - started

    def after_backward(self, model, step: int, autocast) -> None:
        """Apply surgery, EWC and preservation to the gradients of the optimizer step now ending."""
        self.steps += 1
        was_training = model.training
        model.eval()
        try:
            names = [n for n, p in self.params.items() if p.requires_grad]  # frozen ones have no gradient
            tensors = [self.params[n] for n in names]
            if self.surgery is not None and self.batch is not None and step % self.surgery_every == 0:
                started = time.monotonic()
                with autocast():
                    loss = safety_loss(model, self.batch)
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                g_s = [
                    g if g is not None else torch.zeros_like(t) for g, t in zip(grads, tensors, strict=True)
                ]
                before = self.surgery.projected_steps
                n_cos = len(self.surgery.cosines)
                apply_surgery(tensors, g_s, self.surgery_mode, self.surgery)
                self._note("surgery_projected", float(self.surgery.projected_steps - before))
                cos = self.surgery.cosines[n_cos:]
                self._note("surgery_cosine", sum(cos) / len(cos))
                self._note("safety_loss", float(loss.detach()))
                self._time("gradient_surgery", started)
            if self.ewc is not None:
                started = time.monotonic()
                self.ewc.penalty().backward()
                self._note("ewc_penalty", self.ewc.last)
                self._time("ewc", started)
            if self.preservation is not None:
                started = time.monotonic()
                with autocast():
                    term = self.preservation.term(model)
                term.backward()
                self._note("preservation_term", self.preservation.last_term)
                self._note("refusal_projection", self.preservation.last_projection)
                self._time("refusal_preservation", started)
        finally:
            model.train(was_training)

    def log_values(self) -> dict[str, float]:
        """Means since the last log, for the trainer's log line (then reset)."""
        out = {f"safety/{k}": sum(v) / len(v) for k, v in self._window.items() if v}
        self._window.clear()
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        per_step = {k: round(v / max(self.steps, 1), 6) for k, v in self.seconds.items()}
        if self.batch is not None:
            out["safety_batch"] = self.batch.to_json()
        if self.surgery is not None:
            out["gradient_surgery"] = {**self.surgery.to_json(), "every": self.surgery_every}
        if self.ewc is not None:
            out["ewc"] = self.ewc.to_json()
        if self.preservation is not None:
            out["refusal_preservation"] = self.preservation.to_json()
        if self.token_weights is not None:
            out["token_weighting"] = self.token_weights.to_json()
        out["seconds_per_step"] = per_step
        return out


class SafetyGradientsMixin:
    """Mixed into TRL's SFTTrainer / DPOTrainer: ``gradient_options`` None leaves the trainer exactly as TRL's."""

    gradient_options: GradientOptions | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        options = self.gradient_options
        if options is None or options.token_weights is None or not model.training:
            return super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        started = time.monotonic()
        weights = options.token_weights.batch(inputs["input_ids"].cpu(), inputs["attention_mask"].cpu())
        forward = {k: v for k, v in inputs.items() if k not in ("labels", "completion_mask")}
        outputs = model(**forward, use_cache=False)
        loss = weighted_token_loss(outputs.logits, inputs["labels"], weights, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:  # type: ignore[attr-defined]
            loss = loss * self.accelerator.num_processes  # type: ignore[attr-defined]
        options._time("token_weighting", started)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        options = self.gradient_options
        if options is not None and self.accelerator.sync_gradients:  # type: ignore[attr-defined]
            options.after_backward(
                self.model,  # type: ignore[attr-defined]
                self.state.global_step,  # type: ignore[attr-defined]
                self.compute_loss_context_manager,  # type: ignore[attr-defined]
            )
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.gradient_options is not None and "loss" in logs:
            logs.update(self.gradient_options.log_values())
        super().log(logs, start_time)  # type: ignore[misc]


def trainable_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def needs_direction(config) -> bool:
    return bool(config.refusal_preservation or (config.token_weighting and not config.token_weights))


def check_gradient_inputs(config, base_dir: Path) -> None:
    """Refuse a bad --safety-pairs or --token-weights file, or a missing refusal direction, with one line, before
    any model is loaded (the counts of --token-weights are checked against the tokenised data later)."""
    from refusal_probe.train.safety.safety_batch import read_pairs
    from refusal_probe.train.safety.token_weights import read_token_weights

    if config.safety_pairs and (config.gradient_surgery or config.ewc):
        read_pairs(config.safety_pairs)
    if config.token_weighting and config.token_weights:
        read_token_weights(config.token_weights)
    if needs_direction(config):
        from refusal_probe.train.safety.direction import refusal_direction

        refusal_direction(config, base_dir)


class RecordGradients(TrainerCallback):
    """Keep run.json "safety" current with the options' statistics before each save (ManifestWriter writes it) and
    at the end; a resumed run's statistics cover the steps since it resumed."""

    def __init__(self, manifest, options: GradientOptions):
        self.manifest, self.options = manifest, options

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.manifest.safety.update(self.options.to_json())
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.manifest.safety.update(self.options.to_json())


def build_gradient_options(
    config, trainer, tok, run_dir: Path, revision: str, base_dir: Path, manifest=None
) -> GradientOptions:
    """The run's options, built on the trainer's model (LoRA: the adapter's parameters are the trainable ones), set
    on the trainer, with a callback recording them in ``manifest`` when one is given."""
    from refusal_probe.train.safety.safety_batch import SAFETY_DIR, build_safety_batch, harmful_prompts

    model = trainer.model
    params = trainable_params(model)
    options = GradientOptions(params, config.surgery_every, config.surgery_mode)
    was_training = model.training
    model.eval()
    try:
        if config.gradient_surgery or config.ewc:
            options.batch = build_safety_batch(config, model, tok, run_dir, revision)
        if config.gradient_surgery:
            options.surgery = SurgeryStats(config.surgery_mode)
        if config.ewc:
            from refusal_probe.train.safety.ewc import FISHER_FILE, cached_fisher

            assert options.batch is not None
            fisher, _ = cached_fisher(
                model, options.batch, params, Path(run_dir) / SAFETY_DIR / FISHER_FILE, revision
            )
            options.ewc = EWC(float(config.ewc), params, fisher)
        direction = None
        if needs_direction(config):
            from refusal_probe.train.safety.direction import refusal_direction

            direction = refusal_direction(config, base_dir)
        if config.refusal_preservation:
            prompts = harmful_prompts(config.safety_prompts)
            options.preservation = Preservation(
                model, tok, prompts, direction, float(config.refusal_preservation)
            )
        if config.token_weighting:
            from refusal_probe.train.safety.token_weights import build_token_weights

            options.token_weights = build_token_weights(config, model, trainer.train_dataset, direction)
    finally:
        model.train(was_training)
    trainer.gradient_options = options
    if manifest is not None:
        trainer.add_callback(RecordGradients(manifest, options))
    return options


_CLASSES: dict[type, type] = {}


def with_gradient_options(trainer_cls: type) -> type:
    """TRL's trainer class with the mixin in front (one class per TRL class, so pickling and isinstance work)."""
    if trainer_cls not in _CLASSES:
        _CLASSES[trainer_cls] = type(
            f"Safe{trainer_cls.__name__}", (SafetyGradientsMixin, trainer_cls), {"__module__": __name__}
        )
    return _CLASSES[trainer_cls]
