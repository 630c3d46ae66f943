"""The bad-input matrix's harness: a Case is argv built in a scratch workspace plus what its one-line error must name.

Case lists live in ``tests/bad_input_<area>.py`` (a module-level ``CASES``); ``tests/test_bad_input.py`` collects
every such module and drives each case through the real CLI in-process. Nothing here fakes the code under test: the
workspace holds real (tiny) model folders, runs and files, and the command runs exactly as a user's would.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    """``argv(ws)`` builds the faulty input in ``ws`` and returns the command line; the error must hold ``expect``."""

    id: str
    argv: Callable[[Workspace], list[str]]
    expect: tuple[str, ...]
    rc: int = 2
    env: tuple[tuple[str, str], ...] = ()  # environment for the case, e.g. (("HF_HUB_OFFLINE", "1"),)


class Workspace:
    """A scratch folder with builders for real inputs: tiny model dirs, runs of checkpoints, adapters, files.

    Everything under ``root`` except ``out`` is hashed before and after a case: bad input changes nothing of the
    user's. ``out`` is where a case may point ``--out`` (and where nothing is expected to appear either).
    """

    def __init__(self, root: Path, tiny: Path):
        self.root = root
        self.out = root / "out"
        self._tiny = tiny

    def path(self, rel: str) -> Path:
        return self.root / rel

    def file(self, rel: str, content: str | bytes) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def model(self, rel: str = "model") -> Path:
        """A copy of the tiny random Llama chat model (config, safetensors, tokenizer, template)."""
        path = self.root / rel
        if not path.exists():
            shutil.copytree(self._tiny, path)
        return path

    def run(
        self,
        rel: str = "runs/full-lr1e-4",
        steps: tuple[int, ...] = (1, 2),
        manifest: bool = True,
        base: Path | None = None,
        method: str = "full",
        lr: float = 1e-4,
    ) -> Path:
        """A run folder of full-weight ``checkpoint-<step>/`` copies of the tiny model, with our run.json."""
        from refusal_probe.models.manifest import RunManifest

        run = self.root / rel
        base = base or self.model()
        for step in steps:
            if not (run / f"checkpoint-{step}").exists():
                shutil.copytree(self._tiny, run / f"checkpoint-{step}")
        if manifest:
            RunManifest(
                run=run.name,
                method=method,
                base_model=str(base),
                learning_rate=lr,
                total_steps=max(steps),
                checkpoints={s: s / max(steps) for s in steps},
                complete=True,
            ).save(run)
        return run

    def adapter(self, rel: str = "runs/lora-lr1e-4/checkpoint-1", base: Path | None = None) -> Path:
        """A real PEFT LoRA adapter over the tiny model, saved by peft itself."""
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        path = self.root / rel
        if not path.exists():
            base = base or self.model()
            model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
            torch.manual_seed(0)
            peft_model = get_peft_model(
                model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            )
            peft_model.save_pretrained(str(path))
        return path

    def edit_json(self, path: Path, **changes) -> Path:
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))
        return path

    def digest(self) -> dict[str, str]:
        return {
            str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(self.root.rglob("*"))
            if p.is_file() and self.out not in p.parents
        }
