"""One trainer for a run, whichever the method (SFT or DPO path), with its step cap and a note on cut examples."""

from __future__ import annotations

import math
from pathlib import Path

from refusal_probe.core.errors import UserError
from refusal_probe.train.config import TrainConfig


def build_trainer(
    config: TrainConfig,
    model,
    tok,
    examples: list[dict],
    run_dir: Path,
    callbacks: list,
    base_dir: Path | None = None,
):
    """An SFTTrainer (full/lora/qlora) or DPOTrainer (dpo) ready to train; nothing is trained here."""
    from datasets import Dataset

    dataset = Dataset.from_list(examples)
    try:
        if config.method == "dpo":
            from refusal_probe.train.dpo import dpo_trainer

            trainer = dpo_trainer(config, model, tok, dataset, run_dir, callbacks, base_dir)
        else:
            from refusal_probe.train.sft import sft_trainer

            trainer = sft_trainer(config, model, tok, dataset, run_dir, callbacks)
    except ValueError as exc:
        if "Target module" in str(exc) or "target_modules" in str(exc):
            raise UserError(
                f"--lora-targets {','.join(config.lora_targets)}: {str(exc).splitlines()[0][:200]}; "
                "name modules this model has (e.g. q_proj,v_proj) or a preset"
            ) from None
        raise
    _report_length_cuts(trainer.train_dataset, len(examples), config.max_length)
    _cap_steps(trainer, config)
    return trainer


def _report_length_cuts(dataset, n_examples: int, max_length: int) -> None:
    """Say how many examples TRL cut at max_length or dropped (prompt alone too long): silent loss of data misleads."""
    dropped = n_examples - len(dataset)
    cols = [c for c in ("input_ids", "chosen_ids", "rejected_ids", "prompt_ids") if c in dataset.column_names]
    cut = (
        sum(any(len(row[c]) >= max_length for c in cols) for row in dataset.select_columns(cols))
        if cols
        else 0
    )
    if dropped or cut:
        print(
            f"note: of {n_examples} examples, {dropped} dropped (prompt alone >= max_length) and {cut} cut at "
            f"max_length={max_length} tokens; raise --max-length to keep them whole"
        )


def planned_steps(n_batches: int, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps the Trainer will take: ceil(epochs x steps per epoch), capped by max_steps."""
    per_epoch = max(n_batches // grad_accum + int(n_batches % grad_accum > 0), 1)
    total = math.ceil(epochs * per_epoch)
    return min(total, max_steps) if max_steps else total


def _cap_steps(trainer, config: TrainConfig) -> None:
    if config.max_steps is None:
        return
    n_batches = len(trainer.get_train_dataloader())
    if planned_steps(n_batches, config.grad_accum, config.epochs, None) > config.max_steps:
        trainer.args.max_steps = config.max_steps
