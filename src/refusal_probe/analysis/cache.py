"""The analysis cache under ``<out>/cache/``: one JSON entry per checkpoint, keyed by the checkpoint's files, its
base reference and the settings. A corrupt entry (an interrupted disk, a hand edit) is named on the terminal,
removed, and recomputed: a cache never turns into an error."""

from __future__ import annotations

import sys
from pathlib import Path

from refusal_probe.analysis.settings import CACHE_FORMAT, AnalyzeSettings
from refusal_probe.core.hashing import cache_key, model_fingerprint
from refusal_probe.core.io import read_json, safe_filename, write_json

ENTRY_KEYS = ("drift", "deltas")


def note_corrupt(path: Path, reason: str) -> None:
    print(f"note: cache entry {path} is corrupt ({reason}); recomputing it", file=sys.stderr)


def entry_path(cache: Path, ckpt, ref_key: str, settings: AnalyzeSettings) -> Path:
    key = cache_key(
        "ckpt",
        model_fingerprint(ckpt.path),
        ref_key,
        settings.key_fields(),
        str(ckpt.kind),
        ckpt.quant and ckpt.quant.tag,
    )
    return cache / "checkpoints" / safe_filename(ckpt.run) / f"{safe_filename(ckpt.name)}-{key}.json"


def read_entry(path: Path) -> dict | None:
    """The cached rows of one checkpoint, or None when absent or corrupt (then removed, and said so)."""
    if not path.is_file():
        return None
    try:
        entry = read_json(path)
        ok = isinstance(entry, dict) and entry.get("format") == CACHE_FORMAT
        ok = ok and all(isinstance(entry.get(k), list) for k in ENTRY_KEYS)
        if not ok:
            raise ValueError(f"not a {CACHE_FORMAT} entry")
        return entry
    except (ValueError, UnicodeDecodeError, OSError) as exc:  # JSONDecodeError is a ValueError
        note_corrupt(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        path.unlink(missing_ok=True)
        return None


def write_entry(path: Path, ckpt, rows: dict[str, list]) -> dict:
    entry = {"format": CACHE_FORMAT, "checkpoint": ckpt.key, "path": str(ckpt.path), **rows}
    write_json(path, entry)
    return read_json(path)  # as a later run reads it (NaN stored as null)
