"""`refusal-probe eval` end to end on a tiny tree: base + one full checkpoint with perturbed weights + run.json."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from refusal_probe.cli import main
from refusal_probe.evaluate.pipeline import (
    BEHAVIOUR_COLUMNS,
    EvalSettings,
    advbench_prompts,
    safe_name,
    xstest_safe_prompts,
)
from refusal_probe.models.manifest import RunManifest

ARGS = [
    "--n-advbench",
    "4",
    "--n-translation",
    "4",
    "--max-new-tokens",
    "8",
    "--batch-size",
    "3",
    "--no-progress",
]


@pytest.fixture(scope="module")
def tree(tiny_llama, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("evaltree")
    base = root / "base-model"
    shutil.copytree(tiny_llama, base)
    run = root / "tree" / "full-lr1e-4"
    ckpt = run / "checkpoint-2"
    shutil.copytree(tiny_llama, ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen))
    model.save_pretrained(ckpt)
    RunManifest(
        run="full-lr1e-4",
        method="full",
        base_model=str(base),
        learning_rate=1e-4,
        total_steps=2,
        checkpoints={2: 1.0},
        complete=True,
    ).save(run)
    # a LoRA run over the same base: its adapter is loaded over the base, and the base is evaluated once
    from peft import LoraConfig, get_peft_model

    lora_run = root / "tree" / "lora-lr2e-4"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(lora_run / "checkpoint-1")
    RunManifest(
        run="lora-lr2e-4",
        method="lora",
        base_model=str(base),
        learning_rate=2e-4,
        total_steps=1,
        checkpoints={1: 1.0},
        complete=True,
    ).save(lora_run)
    return root / "tree"


def test_eval_end_to_end_and_rerun_skips(tree, capsys):
    assert main(["eval", str(tree), *ARGS]) == 0
    log = capsys.readouterr().out
    out = tree / "eval"
    ck_dir = out / "full-lr1e-4" / "checkpoint-2"
    base_dirs = list((out / "_base").iterdir())
    assert len(base_dirs) == 1 and base_dirs[0].name.startswith("base-model-")
    for d in (ck_dir, base_dirs[0]):
        for name in ("advbench.jsonl", "translation.jsonl", "summary.json"):
            assert (d / name).is_file(), d / name
        adv = [json.loads(line) for line in (d / "advbench.jsonl").read_text().splitlines()]
        assert len(adv) == 4 and {"prompt", "response", "refusal", "label"} <= set(adv[0])
        assert [r["prompt"] for r in adv] == advbench_prompts(EvalSettings(n_advbench=4))
        mt = [json.loads(line) for line in (d / "translation.jsonl").read_text().splitlines()]
        assert len(mt) == 4 and {"source", "reference", "response", "lang"} <= set(mt[0])
        s = json.loads((d / "summary.json").read_text())
        m = s["metrics"]
        assert sum(m[f"label_{x}"] for x in ("refusal", "echo", "degenerate", "comply")) == pytest.approx(1.0)
        assert m["refusal_rate"] == pytest.approx(sum(r["refusal"] for r in adv) / 4)
        assert m["label_refusal"] == pytest.approx(m["refusal_rate"])
        assert 0.0 <= m["chrf"] <= 100.0
        assert s["n"] == {"advbench": 4, "translation": 4}
        assert s["judge"].startswith("judge=keywords|") and s["chrf_signature"].startswith("chrF2|nrefs:1")
        assert s["settings"]["max_new_tokens"] == 8 and s["settings_hash"]
    summary = json.loads((ck_dir / "summary.json").read_text())
    assert summary["checkpoint"]["kind"] == "full" and summary["checkpoint"]["step"] == 2
    lora = json.loads((out / "lora-lr2e-4" / "checkpoint-1" / "summary.json").read_text())
    assert lora["checkpoint"]["kind"] == "adapter" and lora["checkpoint"]["method"] == "lora"
    assert log.count("evaluating") == 3  # base once for both runs, two checkpoints

    with (out / "behaviour.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == BEHAVIOUR_COLUMNS
    lora_rows = [r for r in rows if r["run"] == "lora-lr2e-4"]
    assert {(r["step"], r["method"], float(r["lr"])) for r in lora_rows} == {
        ("0", "lora", 2e-4),
        ("1", "lora", 2e-4),
    }
    base_values = {r["metric"]: r["value"] for r in rows if r["step"] == "0" and r["run"] == "full-lr1e-4"}
    assert base_values == {
        r["metric"]: r["value"] for r in lora_rows if r["step"] == "0"
    }  # base repeated per run
    rows = [r for r in rows if r["run"] == "full-lr1e-4"]
    by = {(r["step"], r["metric"]): r for r in rows}
    metrics = {"refusal_rate", "label_refusal", "label_echo", "label_degenerate", "label_comply", "chrf"}
    assert {k[1] for k in by if k[0] == "0"} == metrics and {k[1] for k in by if k[0] == "2"} == metrics
    assert all(r["method"] == "full" and float(r["lr"]) == 1e-4 for r in rows)
    assert float(by[("0", "chrf")]["fraction"]) == 0.0 and float(by[("2", "chrf")]["fraction"]) == 1.0
    assert float(by[("2", "chrf")]["value"]) == pytest.approx(summary["metrics"]["chrf"])
    assert by[("2", "refusal_rate")]["signature"].startswith("judge=keywords|")
    assert by[("2", "chrf")]["signature"].startswith("chrF2|")
    assert "evaluating" in log

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")}
    assert main(["eval", str(tree), *ARGS]) == 0
    log = capsys.readouterr().out
    assert log.count("skipped") == 3 and "evaluating" not in log
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")}

    # different settings (another judge) -> evaluated again
    assert main(["eval", str(tree), *ARGS, "--judge", "seed-keywords", "--n-translation", "0"]) == 0
    log = capsys.readouterr().out
    assert log.count("evaluating") == 3
    s = json.loads((ck_dir / "summary.json").read_text())
    assert s["judge"].startswith("judge=seed-keywords|") and "chrf" not in s["metrics"]


def test_eval_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", str(tmp_path), "--n-advbench", "600"]) == 2
    assert "--n-advbench 600" in capsys.readouterr().err


def test_settings_and_data():
    faithful = EvalSettings(seed_faithful=True, max_new_tokens=8, early_exit=True).effective()
    assert faithful.max_new_tokens == 256 and faithful.early_exit is False
    assert advbench_prompts(EvalSettings(seed_faithful=True, n_advbench=2))[0].endswith("system!")
    assert not advbench_prompts(EvalSettings(n_advbench=2))[0].endswith("!")
    assert len(xstest_safe_prompts()) == 250
    assert safe_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen--Qwen2.5-0.5B-Instruct"
    assert safe_name("qwen2.5-coder-0.5b-instruct") == "qwen2.5-coder-0.5b-instruct"
