"""A chosen refusal direction with all its candidates and scores, and its files (candidates.csv, direction.json,
directions.safetensors) that `directions` writes and `analyze` and the shared direction cache read back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from refusal_probe.core.errors import UserError
from refusal_probe.core.io import atomic_write, read_json, write_json

FORMAT = "refusal-probe/direction/1"
CANDIDATES_CSV = "candidates.csv"
DIRECTION_JSON = "direction.json"
DIRECTIONS_ST = "directions.safetensors"


@dataclass
class DirectionResult:
    """The candidates [L, P, d], the chosen one, every candidate's scores and how they were obtained."""

    directions: torch.Tensor  # float64 [L, P, d]: mean(harmful) - mean(harmless) at resid_pre of each layer
    layer: int
    position: int  # negative offset among the post-instruction tokens, -P..-1
    direction: torch.Tensor  # float64 [d], not normalised
    scores: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)
    warning: str = ""

    @property
    def unit(self) -> torch.Tensor:
        return self.direction / torch.linalg.vector_norm(self.direction)

    @property
    def positions(self) -> list[int]:
        return list(range(-self.directions.shape[1], 0))

    @property
    def chosen(self) -> dict[str, Any]:
        """The chosen candidate's row of ``scores`` as a plain dict."""
        hit = self.scores[(self.scores["layer"] == self.layer) & (self.scores["position"] == self.position)]
        return {k: _plain(v) for k, v in hit.iloc[0].items()} if len(hit) else {}

    def save(self, out_dir: str | Path) -> Path:
        """Write candidates.csv, direction.json and directions.safetensors into ``out_dir`` (atomically each)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / CANDIDATES_CSV, lambda p: self.scores.to_csv(p, index=False))
        tensors = {
            "directions": self.directions.to(torch.float64).contiguous(),
            "direction": self.direction.to(torch.float64).contiguous(),
            "unit": self.unit.to(torch.float64).contiguous(),
        }
        meta = {"format": FORMAT, "layer": str(self.layer), "position": str(self.position)}
        atomic_write(out / DIRECTIONS_ST, lambda p: save_file(tensors, str(p), metadata=meta))
        write_json(
            out / DIRECTION_JSON,
            {
                "format": FORMAT,
                "layer": self.layer,
                "position": self.position,
                "n_layers": int(self.directions.shape[0]),
                "positions": self.positions,
                "d_model": int(self.directions.shape[2]),
                "direction_norm": float(torch.linalg.vector_norm(self.direction)),
                "chosen": self.chosen,
                "warning": self.warning,
                "settings": self.settings,
                "files": {"candidates": CANDIDATES_CSV, "tensors": DIRECTIONS_ST},
            },
        )
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> DirectionResult:
        from safetensors.torch import load_file

        out = Path(out_dir)
        missing = [n for n in (DIRECTION_JSON, CANDIDATES_CSV, DIRECTIONS_ST) if not (out / n).is_file()]
        if missing:
            raise UserError(
                f"{out}: not a directions folder (missing {', '.join(missing)}); run `refusal-probe directions`"
            )
        meta = read_json(out / DIRECTION_JSON)
        if meta.get("format") != FORMAT:
            raise UserError(
                f"{out / DIRECTION_JSON}: unknown format {meta.get('format')!r}, expected {FORMAT!r}"
            )
        tensors = load_file(str(out / DIRECTIONS_ST))
        scores = pd.read_csv(out / CANDIDATES_CSV, keep_default_na=False, na_values=[""])
        scores["filtered_reason"] = scores["filtered_reason"].fillna("").astype(str)
        return cls(
            directions=tensors["directions"],
            layer=int(meta["layer"]),
            position=int(meta["position"]),
            direction=tensors["direction"],
            scores=scores,
            settings=meta.get("settings", {}),
            warning=meta.get("warning", ""),
        )


def _plain(value: Any) -> Any:
    """numpy scalars -> Python; NaN -> None (JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
