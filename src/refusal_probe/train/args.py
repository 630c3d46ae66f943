"""The Trainer arguments every method shares (SFT and DPO add their own on top)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from refusal_probe.train.config import Device, TrainConfig


def common_args(config: TrainConfig, run_dir: Path) -> dict[str, Any]:
    return dict(
        output_dir=str(run_dir),
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=-1,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        weight_decay=config.weight_decay,
        optim=config.optim,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="no",  # FractionCheckpoints decides
        save_total_limit=None,
        report_to="none",
        bf16=bool(config.bf16),
        fp16=False,
        **_checkpointing_arg(config.gradient_checkpointing),
        use_cpu=config.device == Device.CPU,
        dataloader_pin_memory=config.device != Device.CPU,
        max_length=config.max_length,
        disable_tqdm=False,
    )


def _checkpointing_arg(on: bool) -> dict[str, bool]:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name still warns)."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return (
        {"activation_checkpointing": on}
        if "activation_checkpointing" in names
        else {"gradient_checkpointing": on}
    )
