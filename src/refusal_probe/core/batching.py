"""Padding and batching of token sequences, shared by activation capture, direction selection and generation."""

from __future__ import annotations

from typing import Any

import torch


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (where inputs must go)."""
    return next(model.parameters()).device


def length_sorted_batches(ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped into batches of similar length, to cut padding."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded so that every row's last token is in the last column."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return input_ids, mask


def pad_token_id(tokenizer: Any) -> int:
    for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if pid is not None:
            return int(pid)
    return 0


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as ``generate`` does with left padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
