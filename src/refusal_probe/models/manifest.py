"""The run manifest `run.json` that `refusal-probe train` writes next to its checkpoints.

Format (``"format": "refusal-probe/run/1"``)::

    {
      "format": "refusal-probe/run/1",
      "run": "lora-lr5e-05",                 # run name (folder name by default)
      "method": "lora",                       # full | lora | qlora | dpo
      "base_model": "/abs/path/to/base",      # the base: a local one as an absolute path, else the embedded name/hub id
      "base_model_spec": "../base",           # the base as the user gave it
      "base_model_revision": "sha256:... or hub commit",
      "learning_rate": 5e-05,
      "hyperparameters": {...},               # every training setting, flat
      "total_steps": 40,
      "checkpoints": {"10": 0.25, "20": 0.5, "30": 0.75, "40": 1.0},   # step -> fraction of training
      "data": {"train": {"path": ..., "sha256": ...}, ...},
      "versions": {"torch": ..., "transformers": ..., ...},
      "wall_time_s": 123.4,
      "complete": true
    }

Readers treat every field but ``format`` as optional: a missing value is left empty, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.core.io import read_json, write_json

FORMAT = "refusal-probe/run/1"
MANIFEST = "run.json"
METHODS = ("full", "lora", "qlora", "dpo")


@dataclass
class RunManifest:
    run: str
    method: str | None = None
    base_model: str | None = None
    base_model_spec: str | None = None
    base_model_revision: str | None = None
    learning_rate: float | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    total_steps: int | None = None
    checkpoints: dict[int, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    wall_time_s: float | None = None
    complete: bool = False
    # what the safety-preserving options did (train.safety): frozen layers, EMA, projection, monitor events
    safety: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT}
        out.update(self.__dict__)
        out["checkpoints"] = {str(k): v for k, v in sorted(self.checkpoints.items())}
        return out

    def save(self, run_dir: str | Path) -> Path:
        return write_json(Path(run_dir) / MANIFEST, self.to_json())

    @classmethod
    def load(cls, run_dir: str | Path) -> RunManifest:
        path = Path(run_dir) / MANIFEST
        try:
            raw = read_json(path)
        except ValueError as exc:
            raise UserError(f"{path}: not valid JSON ({exc}); fix or remove the manifest") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise UserError(f'{path}: not a refusal-probe run manifest (expected "format": "{FORMAT}")')
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        known.setdefault("run", Path(run_dir).name)
        known["checkpoints"] = {int(k): float(v) for k, v in (raw.get("checkpoints") or {}).items()}
        return cls(**known)
