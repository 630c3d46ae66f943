"""Devices, checked before any model is loaded: a typo or a missing GPU is one line naming the flag."""

from __future__ import annotations

from refusal_probe.core.errors import UserError


def check_device(device: str, option: str = "--device") -> None:
    """Refuse a device torch does not know, or one this machine lacks, before any model is loaded."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"{option} {device}: not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{option} {device}: CUDA is not available on this machine; use {option} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{option} {device}: MPS is not available on this machine; use {option} cpu")
    elif dev.type != "cpu":
        raise UserError(f"{option} {device}: unsupported device type '{dev.type}'; use cpu, cuda or cuda:N")
