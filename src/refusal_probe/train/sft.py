"""The SFT path: full fine-tuning, LoRA and QLoRA through TRL's SFTTrainer (loss on the answer by default)."""

from __future__ import annotations

from pathlib import Path

from refusal_probe.train.args import common_args
from refusal_probe.train.base import lora_config, upcast_trainable
from refusal_probe.train.config import TrainConfig


def sft_trainer(config: TrainConfig, model, tok, dataset, run_dir: Path, callbacks: list):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **common_args(config, run_dir), completion_only_loss=config.completion_only_loss, packing=False
    )
    from refusal_probe.train.safety.gradients import with_gradient_options

    trainer = with_gradient_options(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=lora_config(config) if config.uses_lora else None,
        callbacks=callbacks,
    )
    if config.method == "qlora":
        upcast_trainable(trainer.model)
    return trainer
