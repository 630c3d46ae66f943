"""Checkpoint trees as researchers have them, read the same way by ``eval`` and ``analyze``.

A tree is one model folder, a run folder, or a folder of runs. A run folder holds checkpoint folders
(``checkpoint-N``, ``step_N``, ``step-N``, ``global_stepN``, ``ckpt-N``, ``epoch-N``) and often, as every HF ``Trainer``
run that ends with ``save_model()`` leaves it, the final model or adapter at its root: that root model is the final
checkpoint (never a base, never dropped; counted once when it duplicates the last checkpoint byte for byte).

Metadata comes from the run manifest (run.json), else trainer_state.json / adapter_config.json / the model card /
folder names, else is left empty. Where each value came from is recorded in ``meta_source``. Folders that cannot be
read as runs are kept in ``Tree.skipped`` with the reason, so the terminal and summary.json can name them.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.core.hashing import sha256_file
from refusal_probe.core.io import OUTPUT_MARKER, read_json, safe_filename
from refusal_probe.models.manifest import MANIFEST, METHODS, RunManifest
from refusal_probe.models.quant import QuantSpec
from refusal_probe.models.source import (
    adapter_base,
    check_config,
    is_adapter_dir,
    is_model_dir,
    looks_local,
    pickle_only,
    read_adapter_config,
    resolve_model_dir,
    resolve_relative,
)

# checkpoint-N (HF Trainer, TRL), step_N / step-N (custom loops, Accelerate), global_stepN (DeepSpeed),
# ckpt-N, epoch-N (per-epoch saves: N is an epoch, the step comes from trainer_state.json)
CHECKPOINT_DIR = re.compile(r"^(checkpoint|step|ckpt|global_step|epoch)[-_]?(\d+)$")
SKIP_DIRS = {
    "analysis",
    "eval",
    "directions",
    "logs",
    "wandb",
    "runs",
    "mlruns",
    "tensorboard",
    "__pycache__",
}
METHOD_IN_NAME = re.compile(r"(?<![a-z])(qlora|lora|dpo|full|fft|sft)(?![a-z])")
LR_IN_NAME = re.compile(r"(?<![a-z])lr[-_=]?([0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?)", re.IGNORECASE)
WEIGHT_FILES = ("*.safetensors",)
FINAL = "final"  # name of a run's root model


class Kind(str, Enum):
    """What a checkpoint folder holds."""

    BASE = "base"
    FULL = "full"
    ADAPTER = "adapter"


@dataclass(frozen=True)
class Checkpoint:
    run: str
    path: Path
    kind: str  # a Kind value
    base: str | None
    method: str | None = None
    lr: float | None = None
    step: int | None = None
    fraction: float | None = None
    quant: QuantSpec | None = None
    name: str = ""  # "base", the checkpoint folder's name, or "final" for a run's root model
    meta_source: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", "base" if self.kind == Kind.BASE else self.path.name)

    @property
    def quantized(self) -> bool:
        return self.quant is not None

    @property
    def key(self) -> str:
        return f"{self.run}/{self.name}"


@dataclass
class Tree:
    """The checkpoints of a tree (each run's base first, as step 0), what was skipped and why, and notes."""

    root: Path | None
    checkpoints: list[Checkpoint]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path": ..., "reason": ...}
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.checkpoints)

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __getitem__(self, i):
        return self.checkpoints[i]

    def add(self, folder: Path, read: Callable[..., tuple[list[Checkpoint], list[str]]], *args: Any) -> None:
        """Add what ``read(*args)`` finds in ``folder``; a folder that cannot be read is kept in ``skipped`` with why."""
        try:
            ckpts, notes = read(*args)
        except UserError as exc:
            reason = str(exc).removeprefix(f"{folder}: ")  # the path is said once, in "path"
            self.skipped.append({"path": str(folder), "reason": reason})
            return
        self.checkpoints += ckpts
        self.notes += notes

    def messages(self) -> list[str]:
        """What the terminal should say before any work: notes and every skipped folder."""
        return [*self.notes, *(f"skipped {s['path']}: {s['reason']}" for s in self.skipped)]

    def skipped_warning(self) -> str | None:
        """Said again at the end of a run, so a partial tree is never mistaken for the whole one."""
        if not self.skipped:
            return None
        names = ", ".join(Path(s["path"]).name for s in self.skipped)
        return (
            f"warning: {len(self.skipped)} folder(s) skipped and missing from these results ({names}); "
            "the reasons are above and in tree.skipped"
        )

    def to_json(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "notes": self.notes}

    def check_output(self, out: Path, flag: str = "--out") -> None:
        """Refuse an output folder in any folder that holds a model (a checkpoint, a base, a run with its final
        model at its root): those are never written."""
        target = Path(out).expanduser().resolve()
        for folder in (target, *target.parents):
            if folder.is_dir() and (is_model_dir(folder) or is_adapter_dir(folder)):
                raise UserError(
                    f"{flag} {out}: lies inside {folder}, which holds a model and is never written; "
                    f"pass {flag} DIR outside it"
                )


def discover(spec: str | os.PathLike, base: str | None = None) -> Tree:
    """Every checkpoint under ``spec`` plus one base checkpoint (step 0) per run, sorted by run then step.

    ``spec`` may also be a model spec that is not a folder (embedded name, hub id, .gguf file): one model on its own.
    """
    text = str(spec)
    root = Path(text).expanduser()
    if not root.exists():
        if looks_local(text):
            raise UserError(
                f"{text}: no such file or folder; pass a model dir, a run dir or a folder of runs"
            )
        model_dir = resolve_model_dir(text)  # embedded name or hub id
        return _alone(model_dir, safe_filename(text.replace("/", "--")), text, base)
    if root.is_file():
        if root.suffix.lower() != ".gguf":
            raise UserError(
                f"{root}: not a folder; pass a model dir, a run dir, a folder of runs or a .gguf file"
            )
        return _alone(resolve_model_dir(root), safe_filename(root.stem), text, base)
    if _is_output(root):
        raise UserError(f"{root}: is an output folder of refusal-probe, not a checkpoint tree")
    if _is_run(root):
        ckpts, notes = _run(root, base)
        return Tree(root, ckpts, notes=notes)
    if is_model_dir(root) or is_adapter_dir(root):
        return _single(root, base)
    return _runs(root, base)


def default_output(spec: str | os.PathLike, what: str) -> Path:
    """Where a command writes by default, so that two trees never share (and so overwrite) one output.

    Inside a folder that holds only checkpoint folders or runs: ``<tree>/<what>``; beside a folder that itself
    holds a model (a single model, or a run with its final model at its root): ``<parent>/<name>-<what>``;
    ``./<what>/<name>`` for a model spec that is not a folder.
    """
    path = Path(str(spec)).expanduser()
    if not path.is_dir():
        name = path.stem if path.suffix.lower() == ".gguf" else str(spec).replace("/", "--")
        return Path(what) / safe_filename(name)
    if is_model_dir(path) or is_adapter_dir(path):
        return path.parent / f"{path.name}-{what}"
    return path / what


# ------------------------------------------------------------------------------------------------ shapes of trees


def _alone(model_dir: Path, name: str, spec: str, base: str | None) -> Tree:
    """A model that is not a folder of ours (embedded, hub, .gguf): on its own, or against --base."""
    if base:
        return Tree(None, _with_base([model_dir], model_dir, base, name))
    return _on_its_own(None, name, model_dir, spec, {"base": "argument", "step": "base", "fraction": "base"})


def _on_its_own(root: Path | None, name: str, model_dir: Path, spec: str, meta: dict[str, str]) -> Tree:
    """A model measured as its own reference (directions, no drift), and a note that says so and names --base."""
    ckpt = Checkpoint(
        name,
        model_dir,
        Kind.BASE,
        spec,
        step=0,
        fraction=0.0,
        meta_source=meta,
    )
    note = f"{spec}: a model on its own, analysed without a base (no drift); pass --base MODEL to compare it with its base"
    return Tree(root, [ckpt], notes=[note])


def _single(folder: Path, base: str | None) -> Tree:
    """One model folder. A fine-tuning checkpoint is never taken for a base: it needs its base (metadata or --base)."""
    evident = _evident_checkpoint(folder)
    run_dir = folder.parent if CHECKPOINT_DIR.match(folder.name) else folder
    manifest = _manifest(folder.parent) if CHECKPOINT_DIR.match(folder.name) else None
    if base or evident or manifest:
        name = _run_name(manifest, run_dir.name)
        return Tree(folder, _with_base([folder], folder.parent if manifest else folder, base, name, manifest))
    return _on_its_own(
        folder, folder.name, folder, str(folder), {"base": "self", "step": "self", "fraction": "self"}
    )


def _runs(root: Path, base: str | None) -> Tree:
    """A folder of runs: every child that is a run or a model; the others are named in ``skipped``.

    A model folder beside the runs that is their base (or the --base itself) is their step 0, not a run of its own.
    """
    tree = Tree(root, [])
    models: list[Path] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not _skipped(p)):
        if not _is_run(child) and (is_model_dir(child) or is_adapter_dir(child)):
            models.append(child)
        elif _is_run(child):
            tree.add(child, _run, child, base)
        else:
            tree.skipped.append({"path": str(child), "reason": _why_not_a_run(child)})
    bases = {Path(c.path).resolve() for c in tree.checkpoints if c.kind == Kind.BASE}
    if base and Path(base).expanduser().exists():
        bases.add(Path(base).expanduser().resolve())
    for child in models:
        if child.resolve() in bases:
            tree.notes.append(f"{child}: the base of runs in this tree, measured as their step 0")
        elif base or _evident_checkpoint(child):
            tree.add(child, _model_run, child, base)
        else:
            sub = _single(child, None)
            tree.checkpoints += sub.checkpoints
            tree.notes += sub.notes
    if not tree.checkpoints:
        reasons = "; ".join(f"{Path(s['path']).name}: {s['reason']}" for s in tree.skipped[:3])
        raise UserError(
            f"{root}: no checkpoints found (expected model files, checkpoint folders such as checkpoint-<step>/, "
            f"or run folders holding them)" + (f"; {reasons}" if reasons else "")
        )
    return tree


# ------------------------------------------------------------------------------------------------ one run


def _model_run(folder: Path, base: str | None) -> tuple[list[Checkpoint], list[str]]:
    """A model folder beside the runs, measured against --base or its own metadata."""
    return _with_base([folder], folder, base, folder.name), []


def _run(run_dir: Path, base: str | None) -> tuple[list[Checkpoint], list[str]]:
    manifest = _manifest(run_dir)
    dirs = _checkpoint_dirs(run_dir)
    notes: list[str] = []
    if not dirs and not (is_model_dir(run_dir) or is_adapter_dir(run_dir)):
        raise UserError(f"{run_dir}: run has no checkpoint folders yet; train it or remove it from the tree")
    for d in dirs:
        check_config(d)
        if is_adapter_dir(d):
            read_adapter_config(
                d
            )  # a damaged adapter_config.json is named here, not blamed on the base later
        if not (is_model_dir(d) or is_adapter_dir(d)):
            if pickle_only(d):
                raise UserError(
                    f"{d}: only pickle weights (*.bin/*.pt); refusal-probe never unpickles files. "
                    "Convert once with save_pretrained(dir, safe_serialization=True)"
                )
            raise UserError(f"{d}: checkpoint holds no safetensors weights or adapter; it may be incomplete")
    root_final = is_model_dir(run_dir) or is_adapter_dir(run_dir)
    if root_final and dirs and _same_weights(run_dir, dirs[-1]):
        notes.append(
            f"{run_dir}: the final model at the run's root is {dirs[-1].name} byte for byte; counted once"
        )
        root_final = False
    folders = dirs + ([run_dir] if root_final else [])
    name = _run_name(manifest, run_dir.name)
    stepless = [d.name for d in folders if d != run_dir and _step(d, manifest, False, folders)[0] is None]
    if stepless:
        notes.append(
            f"{run_dir}: {', '.join(stepless)} without a step (no trainer_state.json global_step); "
            "ordered by folder name, rows keyed by checkpoint name"
        )
    return _with_base(
        folders, run_dir, base, name, manifest, final_dir=run_dir if root_final else None
    ), notes


def _with_base(
    folders: list[Path],
    run_dir: Path,
    base: str | None,
    name: str,
    manifest: RunManifest | None = None,
    final_dir: Path | None = None,
) -> list[Checkpoint]:
    """The base checkpoint (step 0) and one checkpoint per folder, all with the run's metadata."""
    src: dict[str, str] = {}
    base_spec, src["base"] = _base_spec(base, manifest, run_dir, folders)
    method, src["method"] = _method(manifest, name, [*folders, run_dir])
    lr, src["lr"] = _lr(manifest, name)
    hp = manifest.hyperparameters if manifest else {}
    quant = (
        QuantSpec.from_hyperparameters(hp, method)
        if manifest
        else (QuantSpec() if method == "qlora" else None)
    )
    if manifest is None and quant is not None:
        src["quant"] = "folder name (NF4 assumed; run.json records the real spec)"
    elif quant is not None:
        src["quant"] = MANIFEST
    if base_spec is None:
        raise UserError(
            f"{run_dir}: cannot tell which base model run '{name}' started from; pass --base MODEL"
        )
    base_dir = resolve_model_dir(base_spec)
    if is_adapter_dir(base_dir):
        raise UserError(
            f"{base_dir}: the base of run '{name}' is itself an adapter; pass --base with full weights"
        )
    out = [
        Checkpoint(
            name,
            base_dir,
            Kind.BASE,
            base_spec,
            method,
            lr,
            0,
            0.0,
            quant,
            "base",
            {**src, "step": "base", "fraction": "base"},
        )
    ]
    rows = []
    for d in folders:
        final = d == final_dir
        step, step_src = _step(d, manifest, final, folders)
        fraction, frac_src = _fraction(manifest, d, step, folders)
        kind = Kind.ADAPTER if is_adapter_dir(d) else Kind.FULL
        rows.append(
            Checkpoint(
                name,
                d,
                kind,
                base_spec,
                method,
                lr,
                step,
                fraction,
                quant if kind == Kind.ADAPTER else None,
                FINAL if final else d.name,
                {**src, "step": step_src, "fraction": frac_src},
            )
        )
    rows.sort(key=lambda c: (c.step is None, c.step or 0, c.name == FINAL))
    return out + rows


def _same_weights(a: Path, b: Path) -> bool:
    """True when two folders hold byte-identical weight files (sizes first, sha256 only when they match)."""
    files_a = sorted(p for pattern in WEIGHT_FILES for p in a.glob(pattern))
    files_b = sorted(p for pattern in WEIGHT_FILES for p in b.glob(pattern))
    if [p.name for p in files_a] != [p.name for p in files_b] or not files_a:
        return False
    if any(x.stat().st_size != y.stat().st_size for x, y in zip(files_a, files_b, strict=True)):
        return False
    return all(sha256_file(x) == sha256_file(y) for x, y in zip(files_a, files_b, strict=True))


# ------------------------------------------------------------------------------------------------ folder tests


def _is_output(p: Path) -> bool:
    return (p / OUTPUT_MARKER).is_file()


def _skipped(p: Path) -> bool:
    return p.name.startswith((".", "_")) or p.name in SKIP_DIRS or _is_output(p)


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    dirs = [p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_DIR.match(p.name) and not _is_output(p)]
    return sorted(
        dirs,
        key=lambda p: (CHECKPOINT_DIR.match(p.name).group(1), int(CHECKPOINT_DIR.match(p.name).group(2))),  # type: ignore[union-attr]
    )


def _is_run(p: Path) -> bool:
    return bool(_checkpoint_dirs(p)) or (p / MANIFEST).is_file()


def _evident_checkpoint(folder: Path) -> bool:
    """A folder that says it came out of fine-tuning: its name, a trainer_state.json, or an adapter."""
    return (
        bool(CHECKPOINT_DIR.match(folder.name))
        or (folder / "trainer_state.json").is_file()
        or is_adapter_dir(folder)
    )


def _why_not_a_run(p: Path) -> str:
    if pickle_only(p):
        return (
            "only pickle weights (*.bin/*.pt); refusal-probe never unpickles files; convert with "
            "save_pretrained(dir, safe_serialization=True)"
        )
    if (p / "config.json").is_file():
        return "config.json but no *.safetensors weights; it may be incomplete"
    return "no model files, checkpoint folders or run.json"


# ------------------------------------------------------------------------------------------------ metadata


def _run_name(manifest: RunManifest | None, folder_name: str) -> str:
    """The run's name: run.json's ``run`` made a safe single path component (it names output folders)."""
    return safe_filename(manifest.run) if manifest and manifest.run else folder_name


def _manifest(run_dir: Path) -> RunManifest | None:
    return RunManifest.load(run_dir) if (run_dir / MANIFEST).is_file() else None


def _base_spec(base, manifest, run_dir: Path, folders: list[Path]) -> tuple[str | None, str]:
    if base:
        return base, "--base"
    if manifest and manifest.base_model:
        return resolve_relative(manifest.base_model, run_dir), MANIFEST
    for d in folders:
        if is_adapter_dir(d) and (found := adapter_base(d)):
            return found, "adapter_config.json"
    for d in [run_dir, *folders]:
        if found := _card_base(d):
            return found, "README.md (model card base_model)"
    return None, ""


def _card_base(folder: Path) -> str | None:
    """``base_model:`` from a model card's YAML front matter (TRL writes it for hub bases)."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    head = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    m = re.search(r"^base_model:\s*['\"]?([^\s'\"]+)['\"]?\s*$", head, re.MULTILINE)
    return m.group(1) if m else None


def _method(manifest, name: str, folders: list[Path]) -> tuple[str | None, str]:
    if manifest and manifest.method:
        return manifest.method, MANIFEST
    m = METHOD_IN_NAME.search(name.lower())
    named = {"fft": "full", "sft": None}.get(m.group(1), m.group(1)) if m else None
    adapters = [d for d in folders if is_adapter_dir(d)]
    if adapters:
        peft_type = str(read_adapter_config(adapters[0]).get("peft_type", "")).lower()
        if _dpo_logged(folders):
            return "dpo", "trainer_state.json (DPO reward logs)"
        if peft_type == "lora":
            # The adapter config cannot tell LoRA from QLoRA; a folder name that says qlora can.
            return (
                ("qlora", "adapter_config.json+folder name")
                if named == "qlora"
                else ("lora", "adapter_config.json")
            )
    if named in METHODS:
        return named, "folder name"
    if _dpo_logged(folders):
        return "dpo", "trainer_state.json (DPO reward logs)"
    if folders and not adapters and any((d / "trainer_state.json").is_file() for d in folders):
        return "full", "trainer_state.json + full weights"
    return None, ""


def _dpo_logged(folders: list[Path]) -> bool:
    """TRL's DPOTrainer logs rewards/chosen; SFT and plain Trainer runs never do."""
    for d in folders:
        state = _trainer_state(d)
        if any("rewards/chosen" in row for row in state.get("log_history", []) if isinstance(row, dict)):
            return True
    return False


def _lr(manifest, name: str) -> tuple[float | None, str]:
    if manifest and manifest.learning_rate is not None:
        return float(manifest.learning_rate), MANIFEST
    m = LR_IN_NAME.search(name)
    if m:
        try:
            return float(m.group(1)), "folder name"
        except ValueError:
            pass
    return None, ""


# value types of the trainer_state.json keys read here; another type means a damaged file
STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "global_step": int,
    "max_steps": int,
    "log_history": list,
    "epoch": (int, float),
    "num_train_epochs": (int, float),
}


def _trainer_state(d: Path) -> dict:
    """A checkpoint's trainer_state.json ({} without one), read once per discovery however often it is asked for:
    step, fraction and method each look at several folders' states, and a long run's log_history is large."""
    path = d / "trainer_state.json"
    if not path.is_file():
        return {}
    st = path.stat()
    return _read_trainer_state(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=512)
def _read_trainer_state(path: str, mtime_ns: int, size: int) -> dict:
    """Keyed by modification time and size too, so a rewritten file is read again. Callers only read the dict."""
    try:
        state = read_json(path)
    except (OSError, ValueError):
        raise UserError(
            f"{path}: not valid JSON; the checkpoint may be incomplete (remove the file or the folder)"
        ) from None
    bad = [
        k
        for k, t in STATE_TYPES.items()
        if isinstance(state, dict) and state.get(k) is not None and not isinstance(state[k], t)
    ]
    if not isinstance(state, dict) or bad:
        what = f"'{bad[0]}' has the wrong type" if isinstance(state, dict) else "expected a JSON object"
        raise UserError(
            f"{path}: {what} for an HF Trainer state; the checkpoint may be damaged (remove the file)"
        )
    return state


def _step(d: Path, manifest, final: bool, folders: list[Path]) -> tuple[int | None, str]:
    state = _trainer_state(d)
    m = CHECKPOINT_DIR.match(d.name)
    if m and m.group(1) != "epoch":
        return int(m.group(2)), "folder name"
    if "global_step" in state:
        return int(state["global_step"]), "trainer_state.json"
    if final:
        if manifest and manifest.total_steps:
            return int(manifest.total_steps), f"{MANIFEST} total_steps (final model)"
        for other in reversed(folders):
            st = _trainer_state(other)
            if st.get("max_steps"):
                return int(st["max_steps"]), f"{other.name}/trainer_state.json max_steps (final model)"
    return None, ""


def _fraction(manifest, d: Path, step: int | None, folders: list[Path]) -> tuple[float | None, str]:
    if manifest and step is not None and step in manifest.checkpoints:
        return float(manifest.checkpoints[step]), MANIFEST
    if manifest and step is not None and manifest.total_steps:
        return step / manifest.total_steps, MANIFEST
    for src in [d, *reversed(folders)]:
        state = _trainer_state(src)
        if step is not None and state.get("max_steps"):
            where = "trainer_state.json" if src == d else f"{src.name}/trainer_state.json"
            return min(1.0, step / int(state["max_steps"])), where
    return None, ""
