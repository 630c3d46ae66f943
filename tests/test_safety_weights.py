"""Weight-space safety options (issue 9) on tiny random models: the refusal direction source, EMA, layer freezing,
projection off the refusal direction, and the safety monitor's rollback."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from refusal_probe.core.errors import UserError
from refusal_probe.probe.direction_result import DirectionResult
from refusal_probe.train.config import TrainConfig
from refusal_probe.train.safety.direction import refusal_direction

D_MODEL, N_LAYERS = 64, 4  # the tiny models of conftest


def write_direction(folder: Path, d_model: int = D_MODEL, layer: int = 1, seed: int = 0) -> Path:
    """A `directions` folder with a random direction for a tiny model (only the files' format matters here)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(N_LAYERS, 2, d_model, generator=g, dtype=torch.float64)
    scores = pd.DataFrame({"layer": [layer], "position": [-1], "filtered_reason": [""]})
    DirectionResult(directions, layer, -1, directions[layer, 1].clone(), scores).save(folder)
    return folder


@pytest.fixture(scope="module")
def direction_dir(tmp_path_factory) -> Path:
    return write_direction(tmp_path_factory.mktemp("dir") / "direction")


# ---- direction source ----


def test_refusal_direction_from_a_folder(tiny_llama, direction_dir):
    cfg = TrainConfig(model=str(tiny_llama), refusal_direction=str(direction_dir))
    r = refusal_direction(cfg, tiny_llama)
    assert r.layer == 1 and r.unit.dtype == torch.float32 and r.unit.shape == (D_MODEL,)
    assert torch.linalg.vector_norm(r.unit).item() == pytest.approx(1.0, abs=1e-6)
    assert r.source == str(direction_dir)


def test_refusal_direction_refuses_another_models_direction(tiny_llama, tmp_path):
    cfg = TrainConfig(
        model=str(tiny_llama), refusal_direction=str(write_direction(tmp_path / "d", d_model=32))
    )
    with pytest.raises(UserError, match="hidden size 64"):
        refusal_direction(cfg, tiny_llama)


def test_refusal_direction_without_a_source_says_what_to_run(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="run `refusal-probe directions"):
        refusal_direction(TrainConfig(model=str(tiny_llama)), tiny_llama)
    with pytest.raises(UserError, match="no such folder"):
        refusal_direction(
            TrainConfig(model=str(tiny_llama), refusal_direction=str(tmp_path / "x")), tiny_llama
        )
