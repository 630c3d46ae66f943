from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from refusal_probe.analysis import plots
from refusal_probe.analysis.tables import checkpoint_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUNS = (("full-lr5e-05", "full", 5e-5, 0.4), ("lora-lr5e-05", "lora", 5e-5, 0.05))
STEPS = ((0, 0.0), (10, 0.5), (20, 1.0))
MODULES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
SUMMARY = {
    "bases": {"tiny-llama": {"refusal_layer": 2, "position": -1}},
    "runs": {"full-lr5e-05": {"base": "tiny-llama"}, "lora-lr5e-05": {"base": "tiny-llama"}},
    "prompts": {"harmful_train": {"n": 32, "source": "bundled"}, "harmless_train": {"n": 32}},
    "settings": {"positions": 1, "batch_size": 8},
    "signatures": {"judge": "keywords:47|case:insensitive", "chrf": "nrefs:1|case:mixed|eff:yes|nc:6|nw:0"},
}


def synthetic_frames(runs=RUNS, n_layers: int = 4) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """drift, deltas, behaviour for runs x steps 0/10/20 x layers; full drifts far more than LoRA."""
    drift, deltas, beh = [], [], []
    for run, method, lr, k in runs:
        for step, frac in STEPS:
            key = {"run": run, "method": method, "lr": lr, "step": step, "fraction": frac}
            for layer in range(n_layers):
                cos = 1.0 - k * frac * (layer + 1) / n_layers
                gap = 4.0 * cos
                for metric, value in (
                    ("cos_to_base", cos),
                    ("proj_gap", gap),
                    ("norm_ratio", 1 + 0.1 * frac),
                ):
                    drift.append({**key, "layer": layer, "module": "", "metric": metric, "value": value})
                if step:
                    for j, module in enumerate(MODULES):
                        value = k * frac * (layer + 1) * (j + 1)
                        deltas.append(
                            {**key, "layer": layer, "module": module, "metric": "delta_fro", "value": value}
                        )
            beh.append({**key, "metric": "refusal_rate", "value": 0.8 - k * frac, "signature": "kw"})
            beh.append({**key, "metric": "chrf", "value": 40.0 + 10 * frac, "signature": "chrF2"})
    return pd.DataFrame(drift), pd.DataFrame(deltas), pd.DataFrame(beh)


def assert_figure(paths: list[Path], stem: str) -> None:
    assert [p.name for p in paths] == [f"{stem}.png", f"{stem}.svg"]
    png, svg = paths
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 5000  # an actual drawing, not an empty canvas
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert not list(png.parent.glob(".*.tmp"))  # atomic: no temp files left behind


@pytest.fixture(scope="module")
def frames():
    return synthetic_frames()


def test_drift_by_layer(frames, tmp_path):
    drift, _, _ = frames
    paths = plots.plot_drift_by_layer(drift, tmp_path, "cos_to_base", summary=SUMMARY)
    assert_figure(paths, "drift_cos_to_base_by_layer")
    svg = paths[1].read_text()
    # matplotlib draws text as paths and keeps each string in a comment: check title, panels, caption
    assert "<!-- Cosine to base refusal direction by layer, per checkpoint -->" in svg
    assert "full-lr5e-05 (full, lr 5e-05)" in svg and "lora-lr5e-05 (lora, lr 5e-05)" in svg
    assert "model: tiny-llama" in svg and "refusal layer 2" in svg


def test_drift_other_metric_and_unknown_metric(frames, tmp_path):
    drift, _, _ = frames
    assert_figure(
        plots.plot_drift_by_layer(drift, tmp_path, "proj_gap", summary=SUMMARY), "drift_proj_gap_by_layer"
    )
    with pytest.raises(Exception, match="no metric"):
        plots.plot_drift_by_layer(drift, tmp_path, "nope")


def test_cos_heatmap(frames, tmp_path):
    drift, _, _ = frames
    assert_figure(plots.plot_cos_heatmap(drift, tmp_path, summary=SUMMARY), "cos_heatmap")


def test_delta_by_layer(frames, tmp_path):
    _, deltas, _ = frames
    assert_figure(plots.plot_delta_by_layer(deltas, tmp_path, summary=SUMMARY), "delta_by_layer")


def test_layer_norms_are_root_sum_square():
    _, deltas, _ = synthetic_frames()
    norms = plots._layer_norms(deltas)
    row = norms[(norms["run"] == "full-lr5e-05") & (norms["step"] == 20) & (norms["layer"] == 1)]
    k = 0.4 * 1.0 * 2  # k * frac * (layer + 1)
    by_kind = dict(zip(row["kind"], row["value"], strict=True))
    assert by_kind["all modules"] == pytest.approx(k * np.sqrt(1 + 4 + 9))
    assert by_kind["attention"] == pytest.approx(k * np.sqrt(1 + 4))
    assert by_kind["MLP"] == pytest.approx(k * 3)


def test_method_comparison_drawn_for_full_and_lora(frames, tmp_path):
    drift, deltas, beh = frames
    paths = plots.plot_method_comparison(drift, deltas, beh, tmp_path, summary=SUMMARY)
    assert_figure(paths, "method_comparison")


def test_method_comparison_skipped_for_one_method(tmp_path):
    drift, deltas, beh = synthetic_frames(runs=RUNS[:1])
    assert plots.plot_method_comparison(drift, deltas, beh, tmp_path, summary=SUMMARY) == []
    assert not list(tmp_path.iterdir())


def test_matched_learning_rates():
    runs = (*RUNS, ("full-lr1e-04", "full", 1e-4, 0.8), ("dpo-lr5e-05", "dpo", 5e-5, 0.6))
    drift, _, _ = synthetic_frames(runs=runs)
    chosen, note = plots._matched_runs(drift)
    assert sorted(chosen) == ["dpo-lr5e-05", "full-lr5e-05", "lora-lr5e-05"]
    assert "5e-05" in note


def test_behaviour(frames, tmp_path):
    drift, deltas, beh = frames
    table = checkpoint_table(drift, deltas, beh, 2)
    assert_figure(plots.plot_behaviour(beh, table, tmp_path, summary=SUMMARY), "behaviour")
    assert plots.plot_behaviour(pd.DataFrame(), table, tmp_path) == []
    assert plots.plot_behaviour(None, table, tmp_path) == []


def test_caption_names_model_layer_and_prompts():
    text = plots.caption(SUMMARY)
    assert "tiny-llama" in text and "refusal layer 2" in text and "harmful_train 32" in text
    assert len(text.splitlines()) <= 2


def test_progress_falls_back_to_step_when_fraction_unknown():
    df = pd.DataFrame({"run": ["a", "a", "a"], "step": [0, 5, 10], "fraction": [np.nan, np.nan, np.nan]})
    assert plots._progress(df).tolist() == [0.0, 0.5, 1.0]


def test_run_layout_one_row_per_method_lr_high_to_low():
    runs = [(f"{m}-lr{lr:g}", m, lr, 0.1) for m in ("dpo", "lora", "full") for lr in (1e-5, 1e-4, 5e-5)]
    drift, _, _ = synthetic_frames(runs=runs)
    nrows, ncols, slots = plots._run_layout(drift)
    assert (nrows, ncols) == (3, 3)
    assert [r for r, _ in sorted(slots.items(), key=lambda kv: kv[1])][:4] == [
        "full-lr0.0001",
        "full-lr5e-05",
        "full-lr1e-05",
        "lora-lr0.0001",
    ]
    assert plots._run_layout(synthetic_frames()[0])[:2] == (1, 2)
