"""Tiny random chat models (Llama or Qwen2 architecture) built on the spot, for tests and smoke runs.

They have a real byte-level BPE tokenizer trained in a second on bundled prompts and the chat-template shape of
their family, so every code path (templates, post-instruction positions, LoRA, saving, loading) runs as on a real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from refusal_probe import data

SPECIALS = {
    "llama": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}

TEMPLATES = {
    "llama": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    "qwen2": (
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
}


def build_tokenizer(arch: str = "llama", vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = data.harmful_train() + data.harmless_train()[:512] + ["assistant user system \n\n"]
    tok.train_from_iterator(corpus, trainer=trainer)
    if arch == "llama":
        kw = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>")
    else:
        kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    fast.chat_template = TEMPLATES[arch]
    return fast


def build_model(
    arch: str = "llama", vocab_size: int = 384, n_layers: int = 4, hidden: int = 64, seed: int = 0
):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def make_tiny_model(
    path: str | Path, arch: str = "llama", n_layers: int = 4, hidden: int = 64, seed: int = 0
) -> Path:
    """Write a tiny random chat model (safetensors + tokenizer with chat template) to ``path``."""
    path = Path(path)
    tok = build_tokenizer(arch)
    model = build_model(arch, vocab_size=len(tok), n_layers=n_layers, hidden=hidden, seed=seed)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def noisy_full_run(
    base: str | Path, run_dir: Path, steps: tuple[int, ...] = (2, 4), scale: float = 0.02, seed: int = 1
) -> Path:
    """A full fine-tuning run (lr 1e-4) as `train` leaves one: ``checkpoint-<step>`` folders, each the one before
    plus ``scale`` x N(0, 1) noise (seeded) on every weight, and run.json with fraction step / last step."""
    from refusal_probe.models.manifest import RunManifest
    from refusal_probe.models.source import load_model

    torch.manual_seed(seed)
    model, tok = load_model(base)
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
        model.save_pretrained(run_dir / f"checkpoint-{step}")
        tok.save_pretrained(run_dir / f"checkpoint-{step}")
    RunManifest(
        run=run_dir.name,
        method="full",
        base_model=str(base),
        learning_rate=1e-4,
        total_steps=max(steps),
        checkpoints={s: s / max(steps) for s in steps},
        complete=True,
    ).save(run_dir)
    return run_dir


def noisy_lora_run(
    base: str | Path, run_dir: Path, targets: list[str], step: int = 4, scale: float = 0.05
) -> Path:
    """A LoRA run (r 4, lr 1e-4) with one complete ``checkpoint-<step>``: B drawn from ``scale`` x N(0, 1) with the
    global torch generator (so a caller's earlier seeding decides it), and run.json."""
    from peft import LoraConfig, get_peft_model

    from refusal_probe.models.manifest import RunManifest
    from refusal_probe.models.source import load_model

    model, _ = load_model(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    peft_model.save_pretrained(str(run_dir / f"checkpoint-{step}"))
    RunManifest(
        run=run_dir.name,
        method="lora",
        base_model=str(base),
        learning_rate=1e-4,
        total_steps=step,
        checkpoints={step: 1.0},
        complete=True,
    ).save(run_dir)
    return run_dir
