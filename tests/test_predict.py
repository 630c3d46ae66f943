"""The held-out refusal-rate predictor and the per-prompt AUROC against values computed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from refusal_probe.analysis import predict


def _table() -> pd.DataFrame:
    """3 runs x 2 checkpoints: refusal = 0.1 x + offset, offsets 0, 0.2, 0.4 (a base row each, left out)."""
    rows = []
    for run, off, method in (("A", 0.0, "full"), ("B", 0.2, "lora"), ("C", 0.4, "dpo")):
        rows.append(dict(run=run, checkpoint="base", method=method, step=0, x=0.0, refusal_rate=0.75))
        for step, x in ((1, 0.0), (2, 1.0)):
            rows.append(
                dict(
                    run=run, checkpoint=f"c{step}", method=method, step=step, x=x, refusal_rate=off + 0.1 * x
                )
            )
    return pd.DataFrame(rows)


def test_loro_linear_fit_by_hand():
    rows = predict.evaluation_rows(_table(), None)
    assert len(rows) == 6 and "base" not in set(rows["checkpoint"])
    model = predict.linear_model("x", ["x"], ridge=0.0)
    pred = predict.held_out(rows, pd.DataFrame(), model, "run", alpha=0.5)
    got = {(r.run, r.checkpoint): r.predicted for r in pred.itertuples()}
    # held out A: fit on B, C -> slope 0.1, intercept 0.3; B: on A, C -> 0.2 (exact); C: on A, B -> 0.1
    want = {("A", "c1"): 0.3, ("A", "c2"): 0.4, ("B", "c1"): 0.2, ("B", "c2"): 0.3, ("C", "c1"): 0.1}
    want[("C", "c2")] = 0.2
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9)
    s = predict.score(pred)
    assert s["mae"] == pytest.approx((0.3 + 0.3 + 0 + 0 + 0.3 + 0.3) / 6)
    assert s["mae_by_held_out"]["B"] == pytest.approx(0.0, abs=1e-9)
    assert s["worst"]["mae"] == pytest.approx(0.3)
    # A's interval: nested residuals (fit C -> B: -0.2, -0.2; fit B -> C: +0.2, +0.2), alpha 0.5 -> 3rd of 4 = 0.2
    a = pred[pred["run"] == "A"].sort_values("checkpoint")
    assert a["low"].tolist() == pytest.approx([0.1, 0.2])
    assert a["high"].tolist() == pytest.approx([0.5, 0.6])
    # with alpha 0.1 four residuals cannot give a 90% interval: the whole [0, 1]
    wide = predict.held_out(rows, pd.DataFrame(), model, "run", alpha=0.1)
    assert (wide["low"] == 0).all() and (wide["high"] == 1).all()


def test_lomo_is_loro_when_each_method_has_one_run():
    rows = predict.evaluation_rows(_table(), None)
    model = predict.linear_model("x", ["x"], ridge=0.0)
    loro = predict.held_out(rows, pd.DataFrame(), model, "run")
    lomo = predict.held_out(rows, pd.DataFrame(), model, "method")
    assert loro["predicted"].tolist() == pytest.approx(lomo["predicted"].tolist())


def test_fit_linear_exact():
    coef = predict.fit_linear(np.array([[0.0], [1.0], [2.0]]), np.array([1.0, 3.0, 5.0]))
    assert coef == pytest.approx([1.0, 2.0])
    assert predict.apply_linear(coef, np.array([[3.0]])) == pytest.approx([7.0])


def test_conformal_halfwidth_by_hand():
    r = [0.1, -0.4, 0.2, 0.3]
    assert predict.conformal_halfwidth(r, 0.2) == pytest.approx(0.4)  # ceil(5 * 0.8) = 4th smallest |r|
    assert predict.conformal_halfwidth(r, 0.5) == pytest.approx(0.3)  # ceil(5 * 0.5) = 3rd
    assert predict.conformal_halfwidth([0.1], 0.1) == math.inf


def test_auroc_by_hand():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered right
    assert predict.auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert predict.auroc([1.0, 1.0], [False, True]) == pytest.approx(0.5)  # a tie counts half
    assert math.isnan(predict.auroc([1.0, 2.0], [True, True]))


def test_fit_threshold_by_hand():
    assert predict.fit_threshold([0, 1, 2, 3], [False, False, True, True]) == pytest.approx(1.5)
    # two cuts reach 3/4: the lower one (0.5) is taken
    assert predict.fit_threshold([0, 1, 2, 3], [False, True, False, True]) == pytest.approx(0.5)
    assert predict.fit_threshold([1, 2], [True, True]) < 1


def test_fit_logistic_one_class_and_separable():
    a, b = predict.fit_logistic([1.0, 2.0], [True, True])
    assert b == 0 and predict.sigmoid(a) == pytest.approx(0.999)
    a, b = predict.fit_logistic([-2, -1, 1, 2], [False, False, True, True])
    assert b > 0 and predict.sigmoid(a + b * 2) > 0.9 and predict.sigmoid(a - b * 2) < 0.1


def _prompts(table: pd.DataFrame) -> pd.DataFrame:
    """Four prompts per checkpoint, refused exactly when the score is positive; c1 refuses 3 of 4, c2 1 of 4."""
    rows = []
    for r in table.itertuples():
        scores = (-2.0, 1.0, 2.0, 3.0) if r.checkpoint != "c2" else (-3.0, -2.0, -1.0, 2.0)
        for i, s in enumerate(scores):
            rows.append(
                dict(
                    run=r.run, checkpoint=r.checkpoint, prompt_id=i, refused=s > 0, label="", refusal_score=s
                )
            )
            rows[-1]["projection"] = -s  # ranks the verdict backwards: AUROC 0
    return pd.DataFrame(rows)


def test_threshold_model_predicts_the_fraction_above_the_training_cut():
    table = _table()
    prompts = _prompts(table)
    rows = predict.evaluation_rows(table, prompts)
    pred = predict.held_out(rows, prompts, predict.threshold_model(), "run")
    # the training cut is midway between -1 and 1 = 0; held-out c1 has 3 of 4 scores above it, c2 1 of 4
    for r in pred.itertuples():
        assert r.predicted == pytest.approx(0.75 if r.checkpoint == "c1" else 0.25)


def test_prompt_auroc_pooled_and_per_checkpoint():
    prompts = _prompts(_table())
    aur = predict.prompt_auroc(prompts)
    assert aur["refusal_score"]["pooled"] == pytest.approx(1.0)
    assert aur["projection"]["pooled"] == pytest.approx(0.0)
    per = aur["refusal_score"]["per_checkpoint"]
    assert len(per) == 9 and all(p["auroc"] == pytest.approx(1.0) for p in per)


def test_predict_all_report_and_columns(tmp_path):
    table = _table().rename(columns={"x": "proj_gap_at_rl"})
    table["cos_to_base_at_rl"] = 1 - table["proj_gap_at_rl"] / 10
    table["delta_fro_total"] = table["step"].astype(float)
    prompts = _prompts(table)
    pred, report = predict.predict_all(table, prompts)
    assert tuple(pred.columns) == predict.PREDICTION_COLUMNS
    assert set(pred["scheme"]) == {"LORO", "LOMO"}
    assert report["primary"] == "prompt_logistic" and report["baseline"] == "baseline"
    assert set(report["models"]) == {
        "baseline",
        "proj_gap",
        "internals",
        "prompt_threshold",
        "prompt_logistic",
    }
    assert report["n"] == {"checkpoints": 6, "runs": 3, "methods": 3, "prompts": 36}
    assert report["met"]["auroc"] is True and isinstance(report["fails"], str)
    written = predict.write_predictions(table, prompts, tmp_path)
    assert {p.name for p in written} == {"predictions.csv", "predictions.parquet", "prediction.json"}
    assert report["label_noise"]["mae_floor"] is None  # n unknown: no floor claimed
    _, with_n = predict.predict_all(table, prompts, n_judged=32)
    floor = predict.label_noise_mae(table.loc[table["step"] > 0, "refusal_rate"].tolist(), 32)
    assert with_n["label_noise"] == pytest.approx(
        {**with_n["label_noise"], "n_judged": 32, "mae_floor": floor}
    )
    assert f"label noise alone costs MAE {floor:.3f} at n = 32" in with_n["fails"]


def test_label_noise_mae_by_hand():
    # p = 0.5 judged on 2 prompts: 0, 1/2, 1 with probability 1/4, 1/2, 1/4 -> E|x - 1/2| = 1/4
    assert predict.label_noise_mae([0.5], 2) == pytest.approx(0.25)
    assert predict.label_noise_mae([0.0, 1.0], 7) == 0.0  # a certain rate has no noise
    assert predict.label_noise_mae([0.5, 0.0], 2) == pytest.approx(0.125)  # the mean over checkpoints
    # p = 1/4 on 4 prompts: sum_k C(4,k) (1/4)^k (3/4)^(4-k) |k/4 - 1/4| = 81/256 * 1/4 + 54/256 * 1/4 + 12/256 * 2/4 + 1/256 * 3/4
    assert predict.label_noise_mae([0.25], 4) == pytest.approx((81 / 4 + 54 / 4 + 12 / 2 + 3 / 4) / 256)
    assert math.isnan(predict.label_noise_mae([], 32)) and math.isnan(predict.label_noise_mae([0.5], 0))


def test_nothing_written_without_refusal_rates(tmp_path):
    table = _table().drop(columns="refusal_rate")
    assert predict.write_predictions(table, None, tmp_path) == []


# ------------------------------------------------------------------------------------------------ per prompt


def test_eval_folders_never_leave_the_behaviour_folder(tmp_path):
    from types import SimpleNamespace

    from refusal_probe.analysis.per_prompt import eval_folder, find_eval_prompts, note

    beh = tmp_path / "eval" / "behaviour.csv"
    for run, name in (("../..", ".."), ("/etc", "passwd"), ("a/../../b", "c")):
        folder = eval_folder(beh, SimpleNamespace(kind="full", run=run, name=name))
        assert folder is not None and folder.resolve().is_relative_to((tmp_path / "eval").resolve())
    ckpt = SimpleNamespace(kind="full", run="r", name="c", key="r/c")
    assert find_eval_prompts([ckpt], beh) == {} and find_eval_prompts([ckpt], None) == {}
    assert "prompts.csv is not written" in note({}, [ckpt], beh)


def test_bad_eval_record_is_one_line_error(tmp_path):
    from refusal_probe.analysis.per_prompt import read_eval_prompts
    from refusal_probe.core.errors import UserError

    path = tmp_path / "advbench.jsonl"
    path.write_text('{"i": 0, "prompt": "x", "refusal": true, "label": "refusal"}\n{"i": 1, "prompt": "y"}\n')
    with pytest.raises(UserError, match=r"advbench.jsonl: line 2 .*--no-prompt-internals"):
        read_eval_prompts(path)


@pytest.fixture(scope="module")
def eval_tree(tiny_llama, tmp_path_factory):
    """A base and one perturbed full checkpoint, evaluated by `eval` and then analysed."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from refusal_probe.cli import main
    from refusal_probe.models.manifest import RunManifest

    root = tmp_path_factory.mktemp("per-prompt")
    base = root / "base-model"
    shutil.copytree(tiny_llama, base)
    run = root / "tree" / "full-lr1e-4"
    shutil.copytree(tiny_llama, run / "checkpoint-2")
    model = AutoModelForCausalLM.from_pretrained(run / "checkpoint-2", dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen))
    model.save_pretrained(run / "checkpoint-2")
    RunManifest(
        run="full-lr1e-4",
        method="full",
        base_model=str(base),
        learning_rate=1e-4,
        total_steps=2,
        checkpoints={2: 1.0},
        complete=True,
    ).save(run)
    tree = root / "tree"
    small = ["--batch-size", "3", "--no-progress"]
    assert (
        main(
            ["eval", str(tree), "--n-advbench", "5", "--n-translation", "0", "--max-new-tokens", "4", *small]
        )
        == 0
    )
    args = ["--n-prompts", "8", "--n-val", "4", "--no-separability", "--no-deltas", *small]
    assert main(["analyze", str(tree), *args]) == 0
    return tree, base


def test_prompt_rows_match_the_eval_and_a_single_prompt_forward(eval_tree):
    import json

    import torch

    from refusal_probe.models.source import load_model
    from refusal_probe.probe.activations import capture
    from refusal_probe.probe.candidates import refusal_score
    from refusal_probe.probe.direction_result import DirectionResult
    from refusal_probe.probe.refusal_tokens import refusal_token_ids
    from refusal_probe.probe.scoring import encode_batches, last_logits

    tree, base = eval_tree
    out = tree / "analysis"
    prompts = pd.read_csv(out / "prompts.csv")
    assert (out / "prompts.parquet").is_file()
    assert {"run", "checkpoint", "prompt_id", "refused", "label", "projection", "refusal_score"} <= set(
        prompts
    )
    assert np.isfinite(prompts[["projection", "refusal_score"]].to_numpy()).all()
    summary = json.loads((out / "summary.json").read_text())
    assert "prompts.csv" in summary["tables"] and "prompts" in summary["how"]
    # one run: nothing to hold out, but the per-prompt AUROC needs no fit
    report = json.loads((out / "prediction.json").read_text())
    assert not (out / "predictions.csv").exists() and report["n"]["prompts"] == len(prompts)
    assert set(report["auroc"]) == {"refusal_score", "projection"} and "too few groups" in report["fails"]
    folders = {
        "base": tree / "eval" / "_base",
        "checkpoint-2": tree / "eval" / "full-lr1e-4" / "checkpoint-2",
    }
    for name, folder in folders.items():
        (jsonl,) = folder.rglob("advbench.jsonl")
        records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        rows = prompts[prompts["checkpoint"] == name].sort_values("prompt_id")
        assert rows["prompt_id"].tolist() == [r["i"] for r in records]
        assert rows["refused"].tolist() == [r["refusal"] for r in records]
        assert rows["label"].tolist() == [r["label"] for r in records]
    # the base's first prompt recomputed alone (no padding): the same projection and refusal score
    ((_, info),) = summary["bases"].items()
    ref = DirectionResult.load(Path(info["direction_files"]))
    model, tok = load_model(base)
    (jsonl,) = folders["base"].rglob("advbench.jsonl")
    first = json.loads(jsonl.read_text().splitlines()[0])
    acts = capture(model, tok, [first["prompt"]], keep=True, progress=False)
    want_proj = float(acts.per_prompt[0, ref.layer, acts.index(ref.position)].double() @ ref.unit.double())
    logits = last_logits(model, encode_batches(tok, [first["prompt"]], 1, torch.device("cpu")))
    want_score = float(refusal_score(logits, refusal_token_ids(tok))[0])
    got = prompts[(prompts["checkpoint"] == "base") & (prompts["prompt_id"] == first["i"])].iloc[0]
    assert got["projection"] == pytest.approx(want_proj, rel=1e-4, abs=1e-5)
    assert got["refusal_score"] == pytest.approx(want_score, rel=1e-4, abs=1e-4)


def test_a_changed_eval_is_measured_again_and_a_removed_one_leaves_no_rows(eval_tree):
    import json

    from refusal_probe.cli import main

    tree, _ = eval_tree
    out = tree / "analysis"
    (base_jsonl,) = (tree / "eval" / "_base").rglob("advbench.jsonl")
    jsonl = tree / "eval" / "full-lr1e-4" / "checkpoint-2" / "advbench.jsonl"
    flipped = {}
    for name, path in (
        ("base", base_jsonl),
        ("checkpoint-2", jsonl),
    ):  # the base's cached reference, an entry
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        records[0]["refusal"] = not records[0]["refusal"]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        flipped[name] = records[0]
    args = ["--n-prompts", "8", "--n-val", "4", "--no-separability", "--no-deltas", "--batch-size", "3"]
    assert main(["analyze", str(tree), *args, "--no-progress"]) == 0
    prompts = pd.read_csv(out / "prompts.csv")
    for name, rec in flipped.items():
        first = prompts[(prompts["checkpoint"] == name) & (prompts["prompt_id"] == rec["i"])]
        assert first["refused"].tolist() == [rec["refusal"]]
    jsonl.unlink()
    assert main(["analyze", str(tree), *args, "--no-progress"]) == 0
    prompts = pd.read_csv(out / "prompts.csv")
    assert set(prompts["checkpoint"]) == {"base"}
