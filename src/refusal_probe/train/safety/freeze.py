"""--freeze-layers: blocks whose every parameter keeps requires_grad False, so the optimizer never moves them.

``auto`` freezes the blocks that carry the refusal direction: the direction's layer (it is read at that block's
input, so the blocks just before write it and the ones just after read it) and its neighbourhood of +- k blocks.
"""

from __future__ import annotations

from typing import Any

from refusal_probe.core.errors import UserError

AUTO = "auto"


def parse_layer_spec(spec: str) -> list[int] | str:
    """'3,4,7' -> [3, 4, 7]; '10-14' -> [10..14]; mixes '1,3-5'; 'auto' -> 'auto'. UserError names the flag."""
    text = spec.strip().lower()
    if text == AUTO:
        return AUTO
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError(part)
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise UserError(
            f"--freeze-layers {spec!r}: expected layer numbers '3,4,7', a range '10-14' or auto"
        ) from None
    if not out or min(out) < 0:
        raise UserError(f"--freeze-layers {spec!r}: layer numbers start at 0")
    return sorted(out)


def auto_layers(direction_layer: int, k: int, n_layers: int) -> list[int]:
    """The direction's layer and its +-k neighbours, clipped to the model."""
    return [i for i in range(direction_layer - k, direction_layer + k + 1) if 0 <= i < n_layers]


def freeze_blocks(model: Any, layers: list[int]) -> dict[str, Any]:
    """Set requires_grad False on every parameter of those blocks; return what was done (for run.json).

    Call after PEFT wrapping (LoRA: the adapter parameters of those blocks are the ones frozen)."""
    from refusal_probe.models.handle import decoder_layers

    blocks = decoder_layers(model)
    bad = [i for i in layers if i >= len(blocks)]
    if bad:
        raise UserError(
            f"--freeze-layers: layer {bad[0]} does not exist; the model has {len(blocks)} (0-based)"
        )
    frozen = 0
    for i in layers:
        for p in blocks[i].parameters():
            if p.requires_grad:
                frozen += p.numel()
            p.requires_grad_(False)
    left = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if left == 0:
        raise UserError("--freeze-layers: every trainable parameter would be frozen; freeze fewer layers")
    return {"layers": list(layers), "frozen_parameters": frozen, "trainable_parameters_left": left}
