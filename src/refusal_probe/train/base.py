"""The base model of a run: where training runs, the base's identity, and loading it for training (QLoRA's 4-bit base
from the one quantization spec that eval and analyze read back from run.json)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from refusal_probe.core.errors import UserError
from refusal_probe.models.quant import QuantSpec
from refusal_probe.train.config import Device, Dtype, TrainConfig


def resolve_hardware(config: TrainConfig) -> TrainConfig:
    """Pin device, bf16 and gradient checkpointing. On CPU both are forced off: TRL defaults them on, and with them a
    CPU step never finished (see ENVIRONMENT.md)."""
    import torch

    device = config.device
    if device == Device.AUTO:
        device = Device.CUDA.value if torch.cuda.is_available() else Device.CPU.value
    if device == Device.CUDA and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if device == Device.CPU:
        if config.bf16 or config.gradient_checkpointing:
            print("note: bf16 and gradient checkpointing are turned off on CPU (a step would not finish)")
        bf16, gc_on = False, False
    else:
        bf16 = torch.cuda.is_bf16_supported() if config.bf16 is None else config.bf16
        gc_on = config.gradient_checkpointing
    return dataclasses.replace(config, device=device, bf16=bf16, gradient_checkpointing=gc_on)


def torch_dtype(config: TrainConfig):
    import torch

    return torch.bfloat16 if config.dtype == Dtype.BFLOAT16 else torch.float32


def bnb_config(config: TrainConfig):
    return QuantSpec(config.qlora_quant_type, config.qlora_double_quant).bnb_config(config.device)


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


def base_dir_for(config: TrainConfig) -> Path:
    """The local folder of the base; an adapter is refused (training needs full weights)."""
    from refusal_probe.models.source import is_adapter_dir, resolve_model_dir

    base_dir = resolve_model_dir(config.model)
    if is_adapter_dir(base_dir):
        raise UserError(
            f"{config.model}: is a PEFT adapter; train from full weights (merge the adapter first)"
        )
    return base_dir


def load_for_training(config: TrainConfig, base_dir: Path):
    """(model, tokenizer) on CPU for the Trainer to place; QLoRA's 4-bit base goes straight to its device."""
    from refusal_probe.models.source import load_model, load_tokenizer

    if config.method != "qlora":
        model, tok = load_model(base_dir, dtype=torch_dtype(config), device="cpu")
    else:
        from accelerate import PartialState
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM

        device_map = {"": PartialState().local_process_index} if config.device == Device.CUDA else "cpu"
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(base_dir),
                quantization_config=bnb_config(config),
                device_map=device_map,
                dtype=torch_dtype(config),
            )
        except ImportError as exc:
            raise UserError(f"QLoRA needs bitsandbytes ({exc}); pip install 'refusal-probe[qlora]'") from None
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
        tok = load_tokenizer(base_dir)
    model.config.use_cache = False
    return model, tok


def on_device(model, config: TrainConfig):
    """The model where generation before training runs (on-policy pairs); QLoRA's base is there already."""
    if config.method != "qlora" and config.device == Device.CUDA:
        from accelerate import PartialState

        model.to(PartialState().device)
    return model


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


def upcast_trainable(model) -> None:
    """TRL casts the adapter of a 4-bit model to bfloat16; keep it in float32 like the study's QLoRA (peft's default):
    with bfloat16 master weights, AdamW updates below ~0.4% of a weight (lr 5e-6) round away to nothing."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
