"""Checkpoint trees: one model dir, a run dir of ``checkpoint-<step>/`` folders, or a folder of runs.

Metadata comes from the run manifest (run.json), else trainer_state.json / adapter_config.json / folder names, else is
left empty. Where each value came from is recorded in ``meta_source`` so no number is silently guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from refusal_probe.core.errors import UserError
from refusal_probe.core.io import read_json
from refusal_probe.models.manifest import MANIFEST, RunManifest
from refusal_probe.models.source import (
    adapter_base,
    is_adapter_dir,
    is_model_dir,
    read_adapter_config,
    resolve_model_dir,
)

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
SKIP_DIRS = {"analysis", "eval", "directions", "runs", "logs", "wandb"}
METHOD_IN_NAME = re.compile(r"(?<![a-z])(qlora|lora|dpo|full|fft)(?![a-z])")
LR_IN_NAME = re.compile(r"lr[-_=]?([0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?)", re.IGNORECASE)


@dataclass(frozen=True)
class Checkpoint:
    run: str
    path: Path
    kind: str  # "base" | "full" | "adapter"
    base: str | None
    method: str | None = None
    lr: float | None = None
    step: int | None = None
    fraction: float | None = None
    quantized: bool = False
    meta_source: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        return "base" if self.kind == "base" else self.path.name

    @property
    def key(self) -> str:
        return f"{self.run}/{self.name}"


def discover(root: str | Path, base: str | None = None) -> list[Checkpoint]:
    """Every checkpoint under ``root`` plus one base checkpoint (step 0) per run, sorted by run then step."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such file or directory; pass a model dir, a run dir or a folder of runs")
    if not root.is_dir():
        raise UserError(f"{root}: not a directory; pass a model dir, a run dir or a folder of runs")
    if is_model_dir(root) or is_adapter_dir(root):
        return _run(root.parent, [root], base, run_name=root.name, single=True)
    if _checkpoint_dirs(root) or (root / MANIFEST).is_file():
        return _run(root, _checkpoint_dirs(root), base)
    out: list[Checkpoint] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not _skipped(p)):
        if is_model_dir(child) or is_adapter_dir(child):
            out += _run(root, [child], base, run_name=child.name, single=True)
        elif _checkpoint_dirs(child) or (child / MANIFEST).is_file():
            out += _run(child, _checkpoint_dirs(child), base)
    if not out:
        raise UserError(
            f"{root}: no checkpoints found (expected model files, checkpoint-<step>/ folders, or run folders "
            "holding them); pass the folder that `refusal-probe train` wrote"
        )
    return out


def _skipped(p: Path) -> bool:
    return p.name.startswith((".", "_")) or p.name in SKIP_DIRS


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    dirs = [p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_DIR.match(p.name)]
    return sorted(dirs, key=lambda p: int(CHECKPOINT_DIR.match(p.name).group(1)))


def _run(run_dir: Path, ckpt_dirs: list[Path], base: str | None, run_name: str | None = None,
         single: bool = False) -> list[Checkpoint]:
    manifest = RunManifest.load(run_dir) if not single and (run_dir / MANIFEST).is_file() else None
    name = run_name or (manifest.run if manifest else run_dir.name)
    if not ckpt_dirs:
        raise UserError(f"{run_dir}: run has no checkpoint-<step>/ folders yet; train it or remove it from the tree")
    for d in ckpt_dirs:
        if not (is_model_dir(d) or is_adapter_dir(d)):
            raise UserError(f"{d}: checkpoint holds no safetensors weights or adapter; it may be incomplete")

    src: dict[str, str] = {}
    base_spec, src["base"] = _base_spec(base, manifest, ckpt_dirs)
    method, src["method"] = _method(manifest, name, ckpt_dirs)
    lr, src["lr"] = _lr(manifest, name)
    quantized = method == "qlora" or bool(manifest and manifest.hyperparameters.get("load_in_4bit"))

    if base_spec is None:
        if single and not is_adapter_dir(ckpt_dirs[0]):
            # A lone full model with no base: it is its own reference (directions only, no drift).
            return [Checkpoint(name, ckpt_dirs[0], "base", str(ckpt_dirs[0]), method, lr, 0, 0.0, False,
                               {**src, "step": "self", "fraction": "self", "base": "self"})]
        raise UserError(f"{run_dir}: cannot tell which base model run '{name}' started from; pass --base MODEL")

    base_ckpt = Checkpoint(name, resolve_model_dir(base_spec), "base", base_spec, method, lr, 0, 0.0, quantized,
                           {**src, "step": "base", "fraction": "base"})
    out = [base_ckpt]
    for d in ckpt_dirs:
        step, step_src = _step(d)
        fraction, frac_src = _fraction(manifest, d, step)
        kind = "adapter" if is_adapter_dir(d) else "full"
        out.append(Checkpoint(name, d, kind, base_spec, method, lr, step, fraction, quantized and kind == "adapter",
                              {**src, "step": step_src, "fraction": frac_src}))
    return out


def _base_spec(base, manifest, ckpt_dirs) -> tuple[str | None, str]:
    if base:
        return base, "--base"
    if manifest and manifest.base_model:
        return manifest.base_model, MANIFEST
    for d in ckpt_dirs:
        if is_adapter_dir(d) and (found := adapter_base(d)):
            return found, "adapter_config.json"
    return None, ""


def _method(manifest, name: str, ckpt_dirs) -> tuple[str | None, str]:
    if manifest and manifest.method:
        return manifest.method, MANIFEST
    m = METHOD_IN_NAME.search(name.lower())
    named = ("full" if m.group(1) == "fft" else m.group(1)) if m else None
    if ckpt_dirs and is_adapter_dir(ckpt_dirs[0]):
        peft_type = str(read_adapter_config(ckpt_dirs[0]).get("peft_type", "")).lower()
        if peft_type == "lora":
            # The adapter config cannot tell LoRA from QLoRA; a folder name that says qlora can.
            return ("qlora", "adapter_config.json+folder name") if named == "qlora" else ("lora", "adapter_config.json")
    if named:
        return named, "folder name"
    return None, ""


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


def _trainer_state(d: Path) -> dict:
    path = d / "trainer_state.json"
    if not path.is_file():
        return {}
    try:
        return read_json(path)
    except ValueError:
        raise UserError(f"{path}: not valid JSON; the checkpoint may be incomplete") from None


def _step(d: Path) -> tuple[int | None, str]:
    m = CHECKPOINT_DIR.match(d.name)
    if m:
        return int(m.group(1)), "folder name"
    state = _trainer_state(d)
    if "global_step" in state:
        return int(state["global_step"]), "trainer_state.json"
    return None, ""


def _fraction(manifest, d: Path, step: int | None) -> tuple[float | None, str]:
    if manifest and step is not None and step in manifest.checkpoints:
        return float(manifest.checkpoints[step]), MANIFEST
    if manifest and step is not None and manifest.total_steps:
        return step / manifest.total_steps, MANIFEST
    state = _trainer_state(d)
    if step is not None and state.get("max_steps"):
        return step / int(state["max_steps"]), "trainer_state.json"
    return None, ""
