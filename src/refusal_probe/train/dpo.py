"""The DPO path: TRL's DPOTrainer, all parameters against a frozen copy of the base, or through a LoRA adapter."""

from __future__ import annotations

from pathlib import Path

from refusal_probe.train.args import common_args
from refusal_probe.train.base import lora_config, torch_dtype
from refusal_probe.train.config import TrainConfig


def dpo_trainer(
    config: TrainConfig, model, tok, dataset, run_dir: Path, callbacks: list, base_dir: Path | None
):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**common_args(config, run_dir), beta=config.dpo_beta, loss_type=[config.dpo_loss])
    peft_config = lora_config(config) if config.uses_lora else None
    ref_model = None
    if peft_config is None:  # full-parameter DPO: a frozen copy of the base is the reference
        from refusal_probe.models.source import load_model

        ref_model, _ = load_model(
            base_dir or model.config._name_or_path, dtype=torch_dtype(config), device="cpu"
        )
    from refusal_probe.train.safety.gradients import with_gradient_options

    return with_gradient_options(DPOTrainer)(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=callbacks,
    )
