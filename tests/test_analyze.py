"""`refusal-probe analyze` end to end on a real (tiny) tree: base, full checkpoints, a LoRA adapter."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from refusal_probe.cli import main
from refusal_probe.models.source import load_model
from refusal_probe.testing.tiny import noisy_full_run, noisy_lora_run

ARGS = ["--n-prompts", "12", "--n-val", "6", "--batch-size", "6", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def _own_direction_cache(tmp_path_factory):
    """This module's runs share one empty direction cache (the user's own is never touched)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFUSAL_PROBE_CACHE", str(tmp_path_factory.mktemp("direction-cache")))
        yield


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "analysis" not in p.parts
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory, tiny_llama) -> Path:

    root = tmp_path_factory.mktemp("analyze") / "ckpt"
    noisy_full_run(tiny_llama, root / "full-lr1e-04", steps=(2, 4), scale=0.02, seed=1)

    noisy_lora_run(tiny_llama, root / "lora-lr1e-04", ["q_proj", "v_proj", "o_proj", "down_proj"])
    return root


@pytest.fixture(scope="module")
def analysed(tree) -> tuple[Path, dict[str, str]]:
    before = _tree_digest(tree)
    assert main(["analyze", str(tree), *ARGS]) == 0
    return tree / "analysis", before


def test_outputs_exist_and_checkpoints_untouched(tree, analysed):
    out, before = analysed
    for name in ("drift", "weight_deltas", "checkpoints", "direction_candidates"):
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.parquet").is_file()
    assert (out / "summary.json").is_file() and (out / "report.md").is_file()
    assert list(out.glob("*.png")) and list(out.glob("*.svg"))
    assert _tree_digest(tree) == before  # nothing under the tree but analysis/ was written


def test_report_command_writes_the_report_analyze_wrote(analysed, tmp_path):
    """`refusal-probe report` on a copy of the analysis folder (no cache, no model) writes the same report.md."""
    import shutil

    out, _ = analysed
    copy = tmp_path / "analysis"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("cache", "report.*"))
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.md").read_text(encoding="utf-8") == (out / "report.md").read_text(encoding="utf-8")


def test_tidy_columns_and_base_is_checkpoint_zero(analysed):
    out, _ = analysed
    drift = pd.read_csv(out / "drift.csv")
    for col in ("run", "method", "lr", "step", "fraction", "layer", "module", "metric", "value"):
        assert col in drift.columns
    base = drift[(drift["step"] == 0) & (drift["metric"] == "cos_to_base")]
    assert set(base["run"]) == {"full-lr1e-04", "lora-lr1e-04"} and set(base["checkpoint"]) == {"base"}
    # layer 0 reads the embeddings of identical template tokens: a zero direction, so NaN; every later layer is 1
    finite = base[base["layer"] > 0]["value"]
    assert len(finite) == 2 * 3 and finite.notna().all() and finite.between(1 - 1e-9, 1 + 1e-9).all()
    assert base[base["layer"] == 0]["value"].isna().all()
    steps = drift.groupby("run")["step"].unique().to_dict()
    assert sorted(steps["full-lr1e-04"]) == [0, 2, 4] and sorted(steps["lora-lr1e-04"]) == [0, 4]
    assert set(drift[drift["run"] == "full-lr1e-04"]["fraction"].unique()) == {0.0, 0.5, 1.0}


def test_drift_matches_hand_computation(tiny_llama, tree, analysed):
    """cos_to_base at every layer recomputed here from the two models' own activations."""
    from refusal_probe.analysis.pipeline import analysis_prompts
    from refusal_probe.analysis.settings import AnalyzeSettings
    from refusal_probe.probe.activations import capture

    out, _ = analysed
    summary = json.loads((out / "summary.json").read_text())
    position = summary["bases"][str(tiny_llama)]["position"]
    prompts = analysis_prompts(AnalyzeSettings(n_prompts=12, n_val=6))

    def dirs(path):
        model, tok = load_model(path)
        h = capture(model, tok, prompts["harmful_train"], progress=False).mean
        b = capture(model, tok, prompts["harmless_train"], progress=False).mean
        return (h - b)[:, position]

    base, ckpt = dirs(tiny_llama), dirs(tree / "full-lr1e-04" / "checkpoint-2")
    expected = (base * ckpt).sum(-1) / (base.norm(dim=-1) * ckpt.norm(dim=-1))
    drift = pd.read_csv(out / "drift.csv")
    got = drift[(drift["run"] == "full-lr1e-04") & (drift["step"] == 2) & (drift["metric"] == "cos_to_base")]
    got = got.sort_values("layer")["value"].to_numpy()
    finite = torch.isfinite(expected)
    assert int(finite.sum()) == len(expected) - 1  # only layer 0 (identical template embeddings) is undefined
    assert torch.allclose(torch.tensor(got)[finite], expected[finite], atol=1e-6)
    assert (got[~finite.numpy()] != got[~finite.numpy()]).all()  # NaN where the hand computation is undefined


def test_weight_deltas_match_dense_computation(tiny_llama, tree, analysed):
    out, _ = analysed
    deltas = pd.read_csv(out / "weight_deltas.csv")
    base, _ = load_model(tiny_llama)
    full, _ = load_model(tree / "full-lr1e-04" / "checkpoint-4")
    name = "model.layers.1.mlp.down_proj.weight"
    dense = (full.state_dict()[name].double() - base.state_dict()[name].double()).norm().item()
    row = deltas[
        (deltas["run"] == "full-lr1e-04")
        & (deltas["step"] == 4)
        & (deltas["layer"] == 1)
        & (deltas["module"] == "mlp.down_proj")
        & (deltas["metric"] == "delta_fro")
    ]
    assert row["value"].item() == pytest.approx(dense, rel=1e-6)

    lora, _ = load_model(tree / "lora-lr1e-04" / "checkpoint-4")
    merged = lora.merge_and_unload()
    name = "model.layers.2.self_attn.o_proj.weight"
    dense = (merged.state_dict()[name].double() - base.state_dict()[name].double()).norm().item()
    row = deltas[
        (deltas["run"] == "lora-lr1e-04")
        & (deltas["layer"] == 2)
        & (deltas["module"] == "self_attn.o_proj")
        & (deltas["metric"] == "delta_fro")
    ]
    assert row["value"].item() == pytest.approx(dense, rel=1e-6)


def test_rerun_recomputes_only_what_changed(tree, analysed, tiny_llama):
    out, _ = analysed
    entries = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.json")}
    assert len(entries) == 2 + 3  # the shared base (rows.json, direction.json) and three checkpoints
    assert main(["analyze", str(tree), *ARGS]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.json")} == entries  # all cached

    # a sharded pass into a new output, then the plain run assembles without computing anything new
    out2 = tree.parent / "sharded"
    for i in range(2):
        assert main(["analyze", str(tree), "--out", str(out2), "--shard", f"{i}/2", *ARGS]) == 0
    sharded = {p: p.stat().st_mtime_ns for p in (out2 / "cache").rglob("*.json")}
    assert len(sharded) == len(entries)
    assert main(["analyze", str(tree), "--out", str(out2), *ARGS]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out2 / "cache").rglob("*.json")} == sharded
    assert (out2 / "drift.csv").is_file()

    # --no-deltas changes every checkpoint's entry but not the base reference (no deltas of the base)
    base_files = {p: m for p, m in entries.items() if "base" in p.relative_to(out / "cache").parts}
    assert base_files
    assert main(["analyze", str(tree), "--no-deltas", *ARGS]) == 0
    after = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.json")}
    assert {p: m for p, m in after.items() if "base" in p.relative_to(out / "cache").parts} == base_files
    assert len(after) > len(entries)  # new checkpoint entries, keyed on the deltas setting
    # and the previous run's delta tables and plots are not left beside the new results as if current
    assert not (out / "weight_deltas.csv").exists() and not (out / "weight_deltas.parquet").exists()
    assert not list(out.glob("delta_by_layer*"))
    summary = json.loads((out / "summary.json").read_text())
    assert "weight_deltas.csv" not in summary["tables"]
    assert all((out / name).is_file() for name in summary["tables"] + summary["figures"])
    # the correlations table's intervals are described with their bootstrap count
    assert "2000 bootstrap resamples" in summary["how"]["correlations"]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["analyze", "/nonexistent/ckpt"], "no such file"),
        (["analyze", "{tree}", "--harmful", "{empty}"], "holds no prompts"),
        (["analyze", "{tree}", "--shard", "3/2"], "--shard"),
    ],
)
def test_bad_input_is_one_line_error(tree, tmp_path, capsys, argv, fragment):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    argv = [a.format(tree=tree, empty=empty) for a in argv]
    assert main([*argv, "--out", str(tmp_path / "o"), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and "Traceback" not in err


def test_corrupt_cache_entries_are_named_and_recomputed(tree, analysed, capsys):
    out, _ = analysed
    assert main(["analyze", str(tree), *ARGS]) == 0  # the full settings' entries exist
    drift = (out / "drift.csv").read_text()
    # the entry of these settings (a --no-deltas run above left one without deltas beside it)
    entries = (out / "cache" / "checkpoints").rglob("*.json")
    entry = next(p for p in entries if "checkpoint-2" in p.name and json.loads(p.read_text())["deltas"])
    entry.write_text('{"format": "refusal-probe/analysis-cache/3", "drift": [')
    tensors = next((out / "cache" / "base").rglob("directions.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:100])
    capsys.readouterr()
    assert main(["analyze", str(tree), *ARGS]) == 0
    err = capsys.readouterr().err
    assert f"cache entry {entry} is corrupt" in err and "recomputing" in err
    assert f"cache entry {tensors.parent} is corrupt" in err
    assert json.loads(entry.read_text())["drift"]  # rewritten whole
    assert (out / "drift.csv").read_text() == drift  # the same numbers as before


def test_tree_messages_and_skipped_folders_reach_terminal_and_summary(tree, tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(tree / "full-lr1e-04", runs / "full-lr1e-04")
    (runs / "scratch-notes").mkdir()
    (runs / "scratch-notes" / "todo.txt").write_text("not a run")
    out = tmp_path / "analysis"
    assert main(["analyze", str(runs), "--out", str(out), *ARGS, "--no-deltas", "--no-separability"]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "scratch-notes" in err
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(s["path"]).name for s in summary["tree"]["skipped"]] == ["scratch-notes"]
    assert summary["tree"]["skipped"][0]["reason"]
    assert "scratch-notes" in (out / "report.md").read_text()


def test_one_direction_cache_for_directions_and_analyze(tiny_llama, tree, tmp_path, capsys, monkeypatch):
    """`directions` then `analyze` with the matching settings: the candidate scores are computed once, and the
    other way round."""
    run = tree / "full-lr1e-04"
    directions = ["--n-train", "12", "--n-val", "6", "--batch-size", "4", "--quiet"]
    fast = [*ARGS, "--no-deltas", "--no-separability"]
    for first in ("directions", "analyze"):
        cache = tmp_path / f"cache-{first}"
        monkeypatch.setenv("REFUSAL_PROBE_CACHE", str(cache))
        d_out, a_out = tmp_path / f"d-{first}", tmp_path / f"a-{first}"
        steps = [
            ["directions", str(tiny_llama), "--out", str(d_out), *directions],
            ["analyze", str(run), "--out", str(a_out), *fast],
        ]
        if first == "analyze":
            steps.reverse()
        assert main(steps[0]) == 0
        (entry,) = (cache / "directions").iterdir()
        stamps = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
        capsys.readouterr()
        assert main(steps[1]) == 0
        assert f"reusing the candidate scores in {entry}" in capsys.readouterr().out
        assert [p.name for p in (cache / "directions").iterdir()] == [entry.name]
        assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == stamps  # not recomputed
        ours = pd.read_csv(d_out / "candidates.csv")
        theirs = pd.read_csv(a_out / "direction_candidates.csv").drop(columns="base")
        scored = ours["ablation_score"].notna()
        assert scored.sum() > 0
        pd.testing.assert_frame_equal(ours, theirs[list(ours.columns)], check_dtype=False)
        meta = json.loads((d_out / "direction.json").read_text())
        summary = json.loads((a_out / "summary.json").read_text())
        (base,) = summary["bases"].values()
        assert (base["refusal_layer"], base["position"]) == (meta["layer"], meta["position"])


def test_excel_bom_files_are_read(tmp_path):
    from refusal_probe import data
    from refusal_probe.analysis.behaviour import load_behaviour

    prompts = tmp_path / "prompts.csv"
    prompts.write_bytes("\ufeffprompt,other\nHow do I pick a lock?,x\n".encode())
    assert data.load_prompts(prompts) == ["How do I pick a lock?"]
    beh = tmp_path / "behaviour.csv"
    beh.write_bytes("\ufeffrun,checkpoint,step,metric,value\nr,base,0,refusal_rate,0.5\n".encode())
    df, path = load_behaviour(str(tmp_path / "tree"), beh)
    assert path == beh and df["run"].tolist() == ["r"] and df["value"].tolist() == [0.5]


def test_behaviour_joins_by_name_and_old_files_by_step(tmp_path):
    from refusal_probe.analysis.behaviour import align_behaviour
    from refusal_probe.models.tree import Checkpoint

    base = Checkpoint("r", tmp_path / "base", "base", "m", step=0)
    final = Checkpoint("r", tmp_path / "r", "full", "m", step=None, name="final")
    ckpt = Checkpoint("r", tmp_path / "r" / "checkpoint-4", "full", "m", step=4, method="full", lr=1e-4)
    tree = [base, ckpt, final]
    named = pd.DataFrame(
        {
            "run": ["r", "r", "r", "other"],
            "checkpoint": ["base", "final", "checkpoint-4", "base"],
            "step": [0, None, 4, 0],
            "metric": ["refusal_rate"] * 4,
            "value": [0.9, 0.1, 0.5, 0.3],
        }
    )
    out, notes = align_behaviour(named, tree)
    assert dict(zip(out["checkpoint"], out["value"], strict=True)) == {
        "base": 0.9,
        "final": 0.1,
        "checkpoint-4": 0.5,
    }
    assert out.loc[out["checkpoint"] == "checkpoint-4", "method"].item() == "full"
    assert len(notes) == 1 and "other" in notes[0]  # rows of another tree are said, not dropped silently
    old, _ = align_behaviour(named.drop(columns="checkpoint").iloc[[0, 2]], tree)
    assert dict(zip(old["checkpoint"], old["value"], strict=True)) == {"base": 0.9, "checkpoint-4": 0.5}


def test_noise_floors_in_drift_and_checkpoints(analysed):
    """Split-half, bootstrap and random-direction rows per layer; their refusal-layer values in checkpoints.csv."""
    from refusal_probe.probe.noise import NOISE_METRICS

    out, _ = analysed
    drift = pd.read_csv(out / "drift.csv")
    noise = drift[drift["metric"].isin(NOISE_METRICS) & (drift["layer"] > 0)]
    assert set(noise["metric"]) == set(NOISE_METRICS)
    wide = noise.pivot_table(index=["run", "step", "layer"], columns="metric", values="value")
    assert (wide["cos_to_base_ci_low"] <= wide["cos_to_base_ci_high"]).all()
    assert (wide["cos_to_base_ci_high"] <= 1.0 + 1e-12).all() and (wide["proj_gap_random_sd"] > 0).all()
    table = pd.read_csv(out / "checkpoints.csv")
    for m in NOISE_METRICS:
        assert table[f"{m}_at_rl"].notna().all(), m
    base = table[table["step"] == 0]
    assert (base["cos_to_base_ci_high_at_rl"] <= base["cos_to_base_at_rl"] + 1e-12).all()  # the base's floor
