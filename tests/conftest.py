from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusal_probe.models.tiny import make_tiny_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama chat model directory (4 layers, hidden 64). Read-only: copy it before changing it."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama") / "model", arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """A tiny random Qwen2 chat model directory (4 layers, hidden 64). Read-only: copy it before changing it."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen") / "model", arch="qwen2")
