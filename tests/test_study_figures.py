"""The report's Figures 1 and 2 (plots.figure1_refusal_vs_chrf, plots.figure2_over_checkpoints)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_plots import SUMMARY, assert_figure, synthetic_frames

from refusal_probe.analysis import plots
from refusal_probe.analysis.tables import checkpoint_table
from refusal_probe.analysis.uncertainty import wilson

RUNS = (
    ("full-lr1e-04", "full", 1e-4, 0.6),
    ("lora-lr1e-04", "lora", 1e-4, 0.05),
    ("full-lr1e-05", "full", 1e-5, 0.3),
)


def _table() -> pd.DataFrame:
    drift, deltas, beh = synthetic_frames(RUNS)
    return checkpoint_table(drift, deltas, beh, 2)


def test_figure1_lr_is_the_one_most_methods_share():
    t = _table()
    assert plots.figure1_lr(t) == 1e-4  # full and lora there; only full at 1e-5


def test_figure1_paths_from_the_base(tmp_path):
    paths = plots.figure1_refusal_vs_chrf(_table(), tmp_path, n=20, summary=SUMMARY)
    assert_figure(paths, "figure1_refusal_vs_chrf")
    svg = paths[1].read_text()
    assert "Refusal vs chrF at lr 0.0001" in svg
    assert "full-lr1e-04 (full, lr 0.0001)" in svg and "lora-lr1e-04 (lora, lr 0.0001)" in svg
    assert "full-lr1e-05" not in svg  # another learning rate: Figure 2's business
    one = plots.figure1_refusal_vs_chrf(_table(), tmp_path / "lr5", lr=1e-5)
    assert "full-lr1e-05 (full, lr 1e-05)" in one[1].read_text()


def test_figure2_one_column_per_learning_rate(tmp_path):
    paths = plots.figure2_over_checkpoints(_table(), tmp_path, n=20, summary=SUMMARY)
    assert_figure(paths, "figure2_over_checkpoints")
    svg = paths[1].read_text()
    assert "lr 0.0001" in svg and "lr 1e-05" in svg and "Wilson 95%, n = 20 prompts" in svg


def test_error_bars_are_wilson_intervals():
    err = plots._wilson_err(pd.Series([0.0, 0.5, np.nan]), 20)
    lo, hi = wilson(10, 20)
    assert err[:, 0] == pytest.approx([0.0, wilson(0, 20)[1]], abs=1e-12)
    assert err[:, 1] == pytest.approx([0.5 - lo, hi - 0.5], abs=1e-12)
    assert np.isnan(err[:, 2]).all()
    assert plots._wilson_err(pd.Series([0.5]), None) is None


def test_no_behaviour_no_figures(tmp_path):
    drift, deltas, _ = synthetic_frames(RUNS)
    t = checkpoint_table(drift, deltas, None, 2)
    assert (
        plots.figure1_refusal_vs_chrf(t, tmp_path) == [] and plots.figure2_over_checkpoints(t, tmp_path) == []
    )
    assert plots.figure1_refusal_vs_chrf(None, tmp_path) == [] and not list(tmp_path.iterdir())
