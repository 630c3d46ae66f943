"""The four fine-tuning methods through TRL: full, LoRA and QLoRA with SFTTrainer, DPO with DPOTrainer.

``train(config, out_dir)`` writes ``<out>/<run>/checkpoint-<step>/`` (HF Trainer layout: full weights, or a PEFT
adapter) at the configured fractions of training, and ``<out>/<run>/run.json``. A complete run is skipped; an
interrupted one resumes from its newest finished checkpoint.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.data import translation as tdata
from refusal_probe.models.manifest import MANIFEST, RunManifest
from refusal_probe.models.quant import QuantSpec
from refusal_probe.train.callbacks import (
    FractionCheckpoints,
    ManifestWriter,
    PruneOptimizerState,
    checkpoint_dirs,
    last_complete_checkpoint,
)
from refusal_probe.train.config import EXECUTION_ONLY, TrainConfig

# ---- run folder state ----


def run_status(run_dir: Path) -> tuple[str, Path | None]:
    """("complete", None) | ("resume", newest finished checkpoint) | ("new", None)."""
    run_dir = Path(run_dir)
    if (run_dir / MANIFEST).is_file():
        manifest = RunManifest.load(run_dir)
        if manifest.complete:
            return "complete", None
    last = last_complete_checkpoint(run_dir)
    return ("resume", last) if last is not None else ("new", None)


def hyperparameters(config: TrainConfig) -> dict[str, Any]:
    """Every setting, flat, plus what follows from them (effective batch, 4-bit base)."""
    out = config.to_dict()
    out["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate/torchrun
    out["effective_batch_size"] = config.effective_batch_size * out["world_size"]
    out["load_in_4bit"] = config.method == "qlora"
    out["lora_target_modules"] = config.lora_modules() if config.uses_lora else None
    return out


def check_resumable(previous: dict[str, Any], current: dict[str, Any], run_dir: Path) -> None:
    """Refuse to continue a run with settings that change what it learns (execution-only ones may differ)."""
    diffs = [
        k
        for k in sorted(set(previous) | set(current))
        if k not in EXECUTION_ONLY and previous.get(k) != current.get(k)
    ]
    if diffs:
        k = diffs[0]
        raise UserError(
            f"{run_dir}: this run was started with {k}={previous.get(k)!r}, now {k}={current.get(k)!r}; "
            "use another --run-name or --out, or delete the folder to start over"
        )


# ---- hardware ----


def resolve_hardware(config: TrainConfig) -> TrainConfig:
    """Pin device, bf16 and gradient checkpointing. On CPU both are forced off: TRL defaults them on, and with them a
    CPU step never finished (see ENVIRONMENT.md)."""
    import torch

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if device == "cpu":
        if config.bf16 or config.gradient_checkpointing:
            print("note: bf16 and gradient checkpointing are turned off on CPU (a step would not finish)")
        bf16, gc_on = False, False
    else:
        bf16 = torch.cuda.is_bf16_supported() if config.bf16 is None else config.bf16
        gc_on = config.gradient_checkpointing
    return dataclasses.replace(config, device=device, bf16=bf16, gradient_checkpointing=gc_on)


def _dtype(config: TrainConfig):
    import torch

    return torch.bfloat16 if config.dtype == "bfloat16" else torch.float32


def bnb_config(config: TrainConfig):
    """QLoRA's 4-bit base from the one quantization spec that eval and analyze read back from run.json."""
    return QuantSpec(config.qlora_quant_type, config.qlora_double_quant).bnb_config(config.device)


def lora_config(config: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_modules(),
        bias="none",
        task_type="CAUSAL_LM",
    )


# ---- model ----


def base_revision(spec: str, base_dir: Path) -> str:
    """Hub commit / embedded sha256 where known, else sha256 over config.json and the weight files."""
    from refusal_probe.models.source import model_revision

    known = model_revision(spec)
    if known:
        return known
    h = hashlib.sha256()
    for path in [
        base_dir / "config.json",
        *sorted(base_dir.glob("*.safetensors")),
        *sorted(base_dir.glob("*.safetensors.index.json")),
    ]:
        h.update(path.name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def load_for_training(config: TrainConfig, base_dir: Path):
    """(model, tokenizer) on CPU for the Trainer to place; QLoRA's 4-bit base goes straight to its device."""
    from refusal_probe.models.source import load_model, load_tokenizer

    if config.method != "qlora":
        model, tok = load_model(base_dir, dtype=_dtype(config), device="cpu")
    else:
        from accelerate import PartialState
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM

        device_map = {"": PartialState().local_process_index} if config.device == "cuda" else "cpu"
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(base_dir),
                quantization_config=bnb_config(config),
                device_map=device_map,
                dtype=_dtype(config),
            )
        except ImportError as exc:
            raise UserError(f"QLoRA needs bitsandbytes ({exc}); pip install 'refusal-probe[qlora]'") from None
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
        tok = load_tokenizer(base_dir)
    model.config.use_cache = False
    return model, tok


def _upcast_trainable(model) -> None:
    """TRL casts the adapter of a 4-bit model to bfloat16; keep it in float32 like the study's QLoRA (peft's default):
    with bfloat16 master weights, AdamW updates below ~0.4% of a weight (lr 5e-6) round away to nothing."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


# ---- data ----


def pairs_kind(config: TrainConfig) -> str:
    if config.dpo_pairs != "auto":
        return config.dpo_pairs
    return "dataset" if config.train_data == "mt-pref" else "wmt"


def training_examples(
    config: TrainConfig, model, tok, out_dir: Path, revision: str
) -> tuple[list[dict], dict]:
    """Chat examples for the trainer and the provenance to record (source, files, row hash)."""
    kind = pairs_kind(config) if config.method == "dpo" else None
    prov: dict[str, Any] = {
        "source": config.train_data,
        "split": "train",
        "langs": list(config.langs),
        "prompt_format": config.prompt_format,
    }
    if kind == "wmt":
        if "de" not in config.langs:
            raise UserError(
                "--dpo-pairs wmt: the bundled WMT pairs are German->English only; add de to --langs "
                "or use --dpo-pairs on-policy"
            )
        rows = tdata.wmt_pairs(config.n_train, config.seed)
        prov.update(source="wmt22+wmt23", langs=["de"])
    else:
        rows = tdata.translation_split(
            config.langs, "train", config.n_train, config.seed, config.train_data, config.include_nl
        )
    if kind == "on-policy":
        from refusal_probe.train.onpolicy import cache_path, on_policy_pairs

        max_new = min(config.max_length // 2, 128)  # a sentence's translation; longer answers are cut anyway
        cache = cache_path(out_dir, revision, tdata.rows_sha256(rows), config.prompt_format, max_new)
        prov["on_policy_cache"] = str(cache)
        rows = on_policy_pairs(rows, _on_device(model, config), tok, config.prompt_format, cache, max_new)
        if not rows:
            raise UserError("on-policy pairs: the base model reproduced every reference; nothing to prefer")
    if kind is not None:
        prov["dpo_pairs"] = kind
    prov["files"] = tdata.source_files(
        config.train_data if kind != "wmt" else "wmt", config.langs, "wmt" if kind == "wmt" else None
    )
    prov["rows"] = len(rows)
    prov["rows_sha256"] = tdata.rows_sha256(rows)
    make = tdata.dpo_example if config.method == "dpo" else tdata.sft_example
    return [make(r, config.prompt_format) for r in rows], prov


def _on_device(model, config: TrainConfig):
    if config.method != "qlora" and config.device == "cuda":
        from accelerate import PartialState

        model.to(PartialState().device)
    return model


# ---- trainer ----


def _common_args(config: TrainConfig, run_dir: Path) -> dict[str, Any]:
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
        use_cpu=config.device == "cpu",
        dataloader_pin_memory=config.device != "cpu",
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
    peft_config = lora_config(config) if config.uses_lora else None
    try:
        if config.method == "dpo":
            from trl import DPOConfig, DPOTrainer

            args = DPOConfig(
                **_common_args(config, run_dir), beta=config.dpo_beta, loss_type=[config.dpo_loss]
            )
            ref_model = None
            if peft_config is None:  # full-parameter DPO: a frozen copy of the base is the reference
                from refusal_probe.models.source import load_model

                ref_model, _ = load_model(
                    base_dir or model.config._name_or_path, dtype=_dtype(config), device="cpu"
                )
            trainer = DPOTrainer(
                model=model,
                ref_model=ref_model,
                args=args,
                train_dataset=dataset,
                processing_class=tok,
                peft_config=peft_config,
                callbacks=callbacks,
            )
        else:
            from trl import SFTConfig, SFTTrainer

            args = SFTConfig(
                **_common_args(config, run_dir),
                completion_only_loss=config.completion_only_loss,
                packing=False,
            )
            trainer = SFTTrainer(
                model=model,
                args=args,
                train_dataset=dataset,
                processing_class=tok,
                peft_config=peft_config,
                callbacks=callbacks,
            )
    except ValueError as exc:
        if "Target module" in str(exc) or "target_modules" in str(exc):
            raise UserError(
                f"--lora-targets {','.join(config.lora_targets)}: {str(exc).splitlines()[0][:200]}; "
                "name modules this model has (e.g. q_proj,v_proj) or a preset"
            ) from None
        raise
    if config.method == "qlora":
        _upcast_trainable(trainer.model)
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


# ---- the entry point ----


def train(config: TrainConfig, out_dir: str | Path, callbacks: list | None = None) -> Path:
    """Train one run into ``<out_dir>/<run name>/``; return that folder. Skips a complete run, resumes a partial one.

    ``callbacks``: extra transformers TrainerCallbacks (a monitor that evaluates during training, an early stop).
    """
    started = time.monotonic()
    config = resolve_hardware(config.validate())
    out_dir = Path(out_dir)
    run_dir = out_dir / config.name
    status, resume = run_status(run_dir)
    if status == "complete":
        print(f"{run_dir}: complete, skipped")
        return run_dir
    hp = hyperparameters(config)
    previous = RunManifest.load(run_dir) if (run_dir / MANIFEST).is_file() else None
    if previous is not None:
        check_resumable(previous.hyperparameters, hp, run_dir)
    _drop_unfinished_checkpoints(run_dir)

    from refusal_probe.models.source import is_adapter_dir, resolve_model_dir

    base_dir = resolve_model_dir(config.model)
    if is_adapter_dir(base_dir):
        raise UserError(
            f"{config.model}: is a PEFT adapter; train from full weights (merge the adapter first)"
        )
    revision = base_revision(config.model, base_dir)
    model, tok = load_for_training(config, base_dir)
    examples, provenance = training_examples(config, model, tok, out_dir, revision)

    manifest = RunManifest(
        run=config.name,
        method=config.method,
        base_model=config.model,
        base_model_revision=revision,
        learning_rate=config.learning_rate,
        hyperparameters=hp,
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
    if config.keep_optimizer == "resume":
        ours.append(PruneOptimizerState(run_dir))
    trainer = build_trainer(config, model, tok, examples, run_dir, ours + list(callbacks or []), base_dir)
    if resume is not None:
        print(f"{run_dir}: resuming from {resume.name}")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    missing = [s for s in manifest.checkpoints if not (run_dir / f"checkpoint-{s}").is_dir()]
    if missing:
        raise RuntimeError(f"{run_dir}: training ended without checkpoints at steps {missing}")
    manifest.wall_time_s = writer.wall_time()
    manifest.complete = True
    if trainer.is_world_process_zero():
        if config.keep_optimizer == "resume":  # a complete run is never resumed
            for d in checkpoint_dirs(run_dir):
                (d / "optimizer.pt").unlink(missing_ok=True)
        manifest.save(run_dir)
    del trainer, model
    _free_memory()
    return run_dir


def _drop_unfinished_checkpoints(run_dir: Path) -> None:
    """Remove checkpoint folders the Trainer did not finish (no trainer_state.json): they would be re-saved anyway,
    and readers of the tree would trip on half-written weights."""
    for d in checkpoint_dirs(run_dir):
        if not (d / "trainer_state.json").is_file():
            print(f"{d}: unfinished checkpoint removed")
            shutil.rmtree(d, ignore_errors=True)  # several processes may race here under accelerate


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
