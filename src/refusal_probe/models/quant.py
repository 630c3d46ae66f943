"""One quantization spec for training, evaluation and analysis: a QLoRA run is measured over the very 4-bit base
it was trained on (quant type and double quantisation read back from its run.json), never a hard-coded NF4."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refusal_probe.core.errors import UserError

QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class QuantSpec:
    """bitsandbytes 4-bit weights: ``quant_type`` nf4 | fp4, with or without double quantisation."""

    quant_type: str = "nf4"
    double_quant: bool = True

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise UserError(f"4-bit quant type '{self.quant_type}': use one of {', '.join(QUANT_TYPES)}")

    @property
    def tag(self) -> str:
        """A short name for folders and tables: nf4, nf4-nodq, fp4, fp4-nodq."""
        return self.quant_type + ("" if self.double_quant else "-nodq")

    def to_json(self) -> dict[str, Any]:
        return {"bits": 4, "quant_type": self.quant_type, "double_quant": self.double_quant}

    def bnb_config(self, device: str):
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32,
        )

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any], method: str | None) -> QuantSpec | None:
        """The spec a run trained with (run.json hyperparameters), or None for a run on full-precision weights."""
        if method != "qlora" and not hp.get("load_in_4bit"):
            return None
        return cls(str(hp.get("qlora_quant_type") or "nf4"), bool(hp.get("qlora_double_quant", True)))
