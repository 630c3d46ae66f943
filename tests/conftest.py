from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from refusal_probe.testing.tiny import make_tiny_model

# Tiny models gain nothing from a second thread, and on a loaded 2-core machine two threads ran 10-25x slower.
# Tests on the real embedded model ask for all cores with the `all_threads` fixture.
torch.set_num_threads(1)

USER_CACHE = os.environ.get("REFUSAL_PROBE_CACHE")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests write direction entries and converted models into a temporary cache, never the user's: a later
    session must not reuse what a test on a random model left. Integration tests ask for ``user_cache``."""
    mp = pytest.MonkeyPatch()
    mp.setenv("REFUSAL_PROBE_CACHE", str(tmp_path_factory.mktemp("refusal-probe-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def user_cache():
    """The user's cache, where the embedded model is fetched once (about 500 MB) and kept across sessions."""
    mp = pytest.MonkeyPatch()
    if USER_CACHE is None:
        mp.delenv("REFUSAL_PROBE_CACHE", raising=False)
    else:
        mp.setenv("REFUSAL_PROBE_CACHE", USER_CACHE)
    yield
    mp.undo()


@pytest.fixture
def all_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama chat model directory (4 layers, hidden 64). Read-only: copy it before changing it."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama") / "model", arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """A tiny random Qwen2 chat model directory (4 layers, hidden 64). Read-only: copy it before changing it."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen") / "model", arch="qwen2")
