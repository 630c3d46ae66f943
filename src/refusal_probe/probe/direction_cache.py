"""The one direction cache that `directions` and `analyze` share: scoring candidates is the expensive part (about
30 min on a CPU for a 0.5B model), so a direction chosen for a model with the same prompts, token ids, rules and
precision is computed once, whichever command asks first.

Entries live under ``$REFUSAL_PROBE_CACHE`` (default ``$XDG_CACHE_HOME/refusal-probe``, else
``~/.cache/refusal-probe``) in ``directions/<key>/``, as the three files of a
:class:`~refusal_probe.probe.direction_result.DirectionResult`. The key covers the model's identity (weights,
tokenizer and chat template; an adapter's base too), the exact prompt lists, the refusal token ids, the selection
rules, forced layer/position, search, dtype, quantization and capture backend; not the batch size or device.
A corrupt entry is named on the terminal, treated as a miss, and replaced.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from refusal_probe.core.hashing import cache_key, model_fingerprint
from refusal_probe.core.io import atomic_dir, cache_root
from refusal_probe.probe.direction_result import FORMAT, DirectionResult
from refusal_probe.probe.settings import SelectionRules

PROMPT_SETS = ("harmful_train", "harmless_train", "harmful_val", "harmless_val")


def _digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def selection_key(
    model_dirs: Sequence[Path],
    prompts: Mapping[str, Sequence[str]],
    refusal_ids: Sequence[int],
    rules: SelectionRules,
    *,
    layer: int | None,
    position: int | None,
    search: str,
    dtype: str,
    quant: str | None,
    backend: str,
) -> str:
    """The key of one direction choice. ``model_dirs``: the model folder (an adapter: the adapter, then its base)."""
    return cache_key(
        "direction",
        FORMAT,
        [model_fingerprint(Path(d)) for d in model_dirs],
        {name: _digest(prompts[name]) for name in PROMPT_SETS},
        [int(i) for i in refusal_ids],
        rules.to_json(),
        layer,
        position,
        search,
        dtype,
        quant,
        backend,
    )


def entry(key: str) -> Path:
    return cache_root() / "directions" / key


def load(key: str) -> DirectionResult | None:
    """The cached result, or None on a miss; a corrupt entry is named, removed and counted as a miss."""
    folder = entry(key)
    if not folder.exists():
        return None
    try:
        return DirectionResult.load(folder)
    except Exception as exc:  # noqa: BLE001 - bad JSON, truncated safetensors, unreadable: all a miss
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"note: direction cache entry {folder} is corrupt ({reason}); recomputing it", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def store(key: str, result: DirectionResult) -> Path:
    """Write the entry whole (into a temporary folder renamed into place): a reader never sees half of one."""
    return atomic_dir(entry(key), result.save, replace=True)


def rechoose(saved: DirectionResult, layer: int | None, position: int | None) -> DirectionResult:
    """A cached result chosen again from its scores by the current rules (which may have changed since)."""
    from refusal_probe.probe.candidates import choose

    if layer is None or position is None:
        row = choose(saved.scores)
        saved.layer, saved.position, saved.warning = (
            int(row["layer"]),
            int(row["position"]),
            str(row["warning"]),
        )
        n_pos = saved.directions.shape[1]
        saved.direction = saved.directions[saved.layer, n_pos + saved.position].clone()
    return saved
