"""Content identities: file digests, the one model identity (weights plus tokenizer and chat-template files) that
train, eval and analyze key their caches on, and short cache keys built from JSON-able parts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# weights, configs, and everything that shapes the prompt text (tokenizer files, chat template)
FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".gguf", ".jinja", ".model", ".txt", ".tiktoken")
# bookkeeping that changes without changing the model
FINGERPRINT_SKIP = frozenset({"trainer_state.json"})
# files up to this size are hashed whole; larger weight files by header + size + mtime
FULL_HASH_LIMIT = 64 << 20


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(path: Path) -> str:
    """A content identity for a model/checkpoint folder (or a single weights file), cheap enough for every run.

    Covers the weights, configs, adapter files, tokenizer and chat template. Small files are hashed whole; large ones
    by their header (a safetensors header lists tensor names, shapes and offsets), size and modification time, which
    changes whenever the file is rewritten.
    """
    path = Path(path)
    files = (
        [path]
        if path.is_file()
        else sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix in FINGERPRINT_SUFFIXES and p.name not in FINGERPRINT_SKIP
        )
    )
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0".encode())
        if st.st_size <= FULL_HASH_LIMIT:
            h.update(f.read_bytes())
            continue
        with f.open("rb") as fh:
            if f.suffix == ".safetensors":
                header_len = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(header_len, 1 << 24)))
            else:
                h.update(fh.read(1 << 20))
        h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()


def cache_key(*parts: Any) -> str:
    """A short stable key for JSON-able parts (dict order does not matter)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
