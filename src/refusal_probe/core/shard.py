"""``--shard i/n`` for cluster array jobs: task i of n takes every n-th item starting at i (0-based)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeVar

from refusal_probe.core.errors import UserError

T = TypeVar("T")
SHARD = re.compile(r"^(\d+)/(\d+)$")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'3/8' -> (3, 8); None stays None. i is 0-based (SLURM_ARRAY_TASK_ID with --array=0-7)."""
    if text is None:
        return None
    m = SHARD.match(text.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UserError(f"--shard {text}: expected i/n with 0 <= i < n, e.g. --shard 0/4 (task 0 of 4)")
    return int(m.group(1)), int(m.group(2))


def take_shard(items: Sequence[T], shard: tuple[int, int] | None) -> list[T]:
    """Items i, i+n, i+2n, ... of ``items`` (all of them without a shard)."""
    if shard is None:
        return list(items)
    i, n = shard
    return list(items[i::n])
