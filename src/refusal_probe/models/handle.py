"""The loaded-model handle: one object that knows a model's blocks, the modules that write into its residual
stream, its special token ids and its precision, so train, eval and analyze never each re-derive them.

``load_model`` returns a :class:`ModelHandle`; it unpacks as ``model, tokenizer`` where only those two are needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.models.quant import QuantSpec

# Module paths (inside a block) whose output is added to the residual stream, across common architectures:
# llama/qwen2/mistral/gemma/phi3, gpt2 (Conv1D), gpt-neox, gpt-j, opt, phi-1/2, falcon/bloom.
RESIDUAL_WRITERS: frozenset[str] = frozenset(
    {
        "self_attn.o_proj",
        "mlp.down_proj",
        "attn.c_proj",
        "mlp.c_proj",
        "attention.dense",
        "mlp.dense_4h_to_h",
        "attn.out_proj",
        "mlp.fc_out",
        "self_attn.out_proj",
        "fc2",
        "self_attn.dense",
        "mlp.fc2",
        "self_attention.dense",
    }
)
BLOCK_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
)


@dataclass
class ModelHandle:
    """A model in eval mode with its left-padding tokenizer, where it came from and how it was loaded."""

    model: Any
    tokenizer: Any
    path: Path  # the folder loaded (an adapter folder for a PEFT model)
    quant: QuantSpec | None = None

    def __iter__(self) -> Iterator[Any]:
        yield self.model
        yield self.tokenizer

    @property
    def blocks(self):
        return decoder_layers(self.model)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int | None:
        return hidden_size(self.model)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    @property
    def eos_ids(self) -> set[int]:
        """Every id that ends a turn: the tokenizer's EOS and the generation config's (chat models list several)."""
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(gen if isinstance(gen, list | tuple) else [gen])
        return {int(i) for i in ids if i is not None}

    def residual_writers(self) -> dict[tuple[int, str], Any]:
        """(block index, module path inside the block) -> module, for every module writing the residual stream."""
        out = {}
        for i, block in enumerate(self.blocks):
            for name, module in block.named_modules():
                if name in RESIDUAL_WRITERS:
                    out[(i, name)] = module
        return out


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_size(model) -> int | None:
    """The residual-stream width from the model config (also through PEFT and multimodal wrappers)."""
    config = getattr(_inner(model), "config", None)
    config = getattr(config, "text_config", None) or config
    size = getattr(config, "hidden_size", None)
    return int(size) if size is not None else None


def decoder_layers(model):
    """The ModuleList of transformer blocks, through PEFT wrappers and across common architectures."""
    import torch

    inner = _inner(model)
    for path in BLOCK_PATHS:
        obj = inner
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    n = getattr(getattr(inner, "config", None), "num_hidden_layers", None)
    for module in inner.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise UserError(
        f"cannot find the transformer blocks of {type(inner).__name__}; this architecture is not supported"
    )
