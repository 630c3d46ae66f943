"""`refusal-probe project CKPT --out DIR`: --project-off-refusal after the fact, on a saved checkpoint or adapter.

Reads the checkpoint's safetensors (no model is loaded), projects every residual-stream writer's update off the base
refusal direction (full: W_base + (I - r r^T)(W - W_base); LoRA: (I - r r^T) B) and writes a NEW checkpoint folder:
the user's checkpoint is never written, --out may not lie inside it, and the folder appears whole or not at all
(written into a temporary sibling, then renamed). Optimizer, scheduler, RNG and EMA state are not copied: they
belong to the unprojected weights.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError

PROJECTION_JSON = "projection.json"
NOT_COPIED = ("optimizer.pt", "scheduler.pt", "ema_state.pt", "rng_state")
CONV1D_MODEL_TYPES = ("gpt2",)  # Conv1D weights are [in, out]: the output side is the columns


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "project",
        help="remove a checkpoint's or adapter's update along the base refusal direction (a new checkpoint)",
        description="Apply --project-off-refusal after the fact: for every module that writes the residual "
        "stream, remove the component of the update along the base model's refusal direction r (full weights: "
        "W_base + (I - r r^T)(W - W_base); LoRA: B <- (I - r r^T) B) and write the result as a new checkpoint "
        "folder --out. The checkpoint itself is never changed.",
    )
    p.add_argument(
        "checkpoint", metavar="CKPT", help="a full-weight checkpoint folder or a PEFT LoRA adapter"
    )
    p.add_argument("--out", metavar="DIR", required=True, help="the new checkpoint folder (must not exist)")
    p.add_argument(
        "--base",
        metavar="BASE",
        default=None,
        help="the base model (default: the adapter's recorded base, or the run.json next to the checkpoint)",
    )
    p.add_argument(
        "--refusal-direction",
        metavar="DIR",
        default=None,
        help="folder written by `refusal-probe directions` for the base (default: the shared direction cache)",
    )
    p.set_defaults(func=_project)


def _project(args: argparse.Namespace) -> int:
    out = project_checkpoint(
        args.checkpoint, args.out, base=args.base, refusal_direction=args.refusal_direction
    )
    print(out)
    return 0


def _base_spec(ckpt: Path, adapter: bool, base: str | None) -> str:
    if base:
        return base
    if adapter:
        from refusal_probe.models.source import adapter_base

        found = adapter_base(ckpt)
        if found:
            return found
        raise UserError(f"{ckpt}: the adapter names no base model; pass --base BASE")
    from refusal_probe.models.manifest import MANIFEST, RunManifest

    if (ckpt.parent / MANIFEST).is_file():
        m = RunManifest.load(ckpt.parent)
        spec = m.base_model_spec or m.base_model
        if spec:
            return str(spec)
    raise UserError(f"{ckpt}: no run.json next to the checkpoint names its base; pass --base BASE")


def _check_out(out: Path, ckpt: Path, base_dir: Path) -> None:
    target = out.expanduser().resolve()
    for folder, what in ((ckpt.resolve(), "the checkpoint"), (base_dir.resolve(), "the base model")):
        if target == folder or folder in target.parents:
            raise UserError(
                f"--out {out}: lies inside {what} {folder}, which is never written; pass another DIR"
            )
    if out.exists():
        raise UserError(f"--out {out}: already exists; pass a new folder (a checkpoint is never overwritten)")
    existing = next(p for p in target.parents if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"--out {out}: cannot write in {existing}")


def _tensors(folder: Path) -> dict[Path, dict[str, Any]]:
    from safetensors.torch import load_file

    return {p: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}


def project_checkpoint(
    checkpoint: str | Path, out: str | Path, base: str | None = None, refusal_direction: str | None = None
) -> Path:
    """Write the projected copy of ``checkpoint`` to ``out``; return ``out``. Every refusal comes before writing."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from refusal_probe.core.io import write_json
    from refusal_probe.models.source import is_adapter_dir, resolve_model_dir
    from refusal_probe.train.config import TrainConfig
    from refusal_probe.train.safety.direction import refusal_direction as find_direction
    from refusal_probe.train.safety.project import project_full_tensors, project_lora_tensors

    ckpt, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    if not ckpt.is_dir():
        raise UserError(f"{checkpoint}: no such checkpoint folder")
    adapter = is_adapter_dir(ckpt)
    if not adapter and not (ckpt / "config.json").is_file():
        raise UserError(f"{checkpoint}: neither a full checkpoint (config.json) nor a PEFT adapter")
    if not list(ckpt.glob("*.safetensors")):
        raise UserError(f"{checkpoint}: holds no .safetensors weights (save with safetensors to project it)")
    spec = _base_spec(ckpt, adapter, base)
    base_dir = resolve_model_dir(spec)
    if is_adapter_dir(base_dir):
        raise UserError(f"--base {spec}: is an adapter; pass the full base model")
    _check_out(out, ckpt, base_dir)
    direction = find_direction(TrainConfig(model=spec, refusal_direction=refusal_direction), base_dir)
    unit = direction.unit

    files = _tensors(ckpt)
    projected: list[str] = []
    new: dict[Path, dict[str, Any]] = {}
    if adapter:
        for path, tensors in files.items():
            new[path], done = project_lora_tensors(tensors, unit)
            projected += done
    else:
        base_tensors: dict[str, Any] = {}
        for tensors in _tensors(base_dir).values():
            base_tensors.update(tensors)
        model_type = getattr(AutoConfig.from_pretrained(base_dir), "model_type", "")
        out_dim = 1 if model_type in CONV1D_MODEL_TYPES else 0
        for path, tensors in files.items():
            new[path], done = project_full_tensors(tensors, base_tensors, unit, out_dim)
            projected += done
    if not projected:
        raise UserError(
            f"{checkpoint}: no module that writes the residual stream was found to project "
            "(an adapter needs o_proj/down_proj-like targets)"
        )

    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.resolve().parent))
    try:
        for item in ckpt.iterdir():
            if item.suffix == ".safetensors" or item.name.startswith(NOT_COPIED):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        for path, tensors in new.items():
            save_file(tensors, str(tmp / path.name), metadata={"format": "pt"})
        write_json(
            tmp / PROJECTION_JSON,
            {
                "source": str(ckpt.resolve()),
                "kind": "adapter" if adapter else "full",
                "base": spec,
                "refusal_direction": direction.to_json(),
                "rule": "B <- (I - r r^T) B" if adapter else "W <- W_base + (I - r r^T)(W - W_base)",
                "projected": projected,
            },
        )
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"projected {len(projected)} tensors of {ckpt} off the refusal direction (layer {direction.layer})")
    return out
