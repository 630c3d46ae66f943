"""Atomic file writes: a reader never sees a half-written result, and an interrupted run leaves no debris."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError


def safe_filename(text: str) -> str:
    """A folder or file name from a model name, run name or spec: characters outside [A-Za-z0-9._+-] become '_'."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._")[:80] or "model"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then rename tmp over ``path`` (same directory, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_dir(folder: str | os.PathLike, write: Callable[[Path], object], replace: bool = False) -> Path:
    """Fill a temporary sibling folder with ``write(tmp)``, then rename it to ``folder``: a reader (another shard of
    an array job, say) never sees half of one. A ``folder`` already there is swapped for the new one with
    ``replace``; otherwise it is kept (another process stored the same content first)."""
    import shutil

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        if replace and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # stored by another process first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def finite(obj: Any) -> Any:
    """NaN/inf -> None, recursively: JSON has no NaN and other readers reject the token."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(
        path, json.dumps(finite(obj), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"
    )


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_text_utf8(path: str | os.PathLike, where: str | None = None) -> str:
    """A user's text file (an Excel BOM is dropped); bytes that are not UTF-8 are one error naming their line."""
    path = Path(path)
    where = where or str(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{where}: line {line} is not UTF-8 text ({exc.reason}); save the file as UTF-8"
        ) from None
    except OSError as exc:
        raise UserError(f"{where}: cannot read it ({exc.strerror or type(exc).__name__})") from None


def read_jsonl(path: str | os.PathLike, where: str | None = None) -> list[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSONL file; a line that is not JSON is one error naming it.

    Lines are split on "\n" only: str.splitlines() also splits inside JSON strings (U+2028, U+0085) and miscounts.
    """
    where = where or str(path)
    out = []
    for number, line in enumerate(read_text_utf8(path, where).split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{where}: line {number} is not valid JSON ({exc.msg} at column {exc.colno}); fix that line"
            ) from None
    return out


def cache_root() -> Path:
    """``$REFUSAL_PROBE_CACHE`` or the platform's user cache dir: converted models, direction entries, locks."""
    env = os.environ.get("REFUSAL_PROBE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("refusal-probe"))


# ------------------------------------------------------------------------------------------------ output folders

OUTPUT_MARKER = ".refusal-probe-output"  # tree discovery skips folders holding it: outputs are never inputs


def prepare_output(path: str | os.PathLike, flag: str = "--out", marker: bool = True) -> Path:
    """Create ``path`` (with the output marker unless ``marker=False``) and prove it writable, before any model is
    loaded.

    An unwritable default inside a read-only tree is found here, with the flag that fixes it, instead of as an
    internal error after an hour of work. ``train`` passes ``marker=False``: its --out is the very tree that eval and
    analyze read, so it must not be marked as an output.
    """
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
        mark = path / OUTPUT_MARKER
        if marker and not mark.exists():
            mark.write_text("refusal-probe writes here; checkpoint discovery skips this folder\n")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(
            f"{flag} {path}: cannot write there ({reason}); pass {flag} DIR with a writable folder"
        ) from None
    return path


@contextmanager
def output_lock(path: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold an exclusive lock on an output folder: a second run on the same folder is told, not interleaved."""
    import fcntl

    lock_path = Path(path) / ".lock"
    handle = open(lock_path, "a+")  # noqa: SIM115 - held for the whole block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(
                f"{path}: another {command} run ({holder}) is writing this folder; wait for it to "
                "finish or pass --out DIR"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()
