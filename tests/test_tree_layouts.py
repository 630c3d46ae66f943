"""Checkpoint trees as the field's own tools write them, read by `analyze` and `eval` alike.

The study's layout comes from real HF `Trainer`, TRL `SFTTrainer` (LoRA) and TRL `DPOTrainer` runs on a tiny model:
``save_steps=0.25`` writes ``checkpoint-N/`` folders with ``trainer_state.json``, and a final ``save_model()`` puts
the final model (or adapter) at the run's root. Nothing here is written by refusal-probe's own `train`.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from refusal_probe.cli import main
from refusal_probe.models.tree import FINAL, discover

ANALYZE = [
    "--n-prompts",
    "8",
    "--n-val",
    "4",
    "--batch-size",
    "8",
    "--layer",
    "2",
    "--position",
    "-1",
    "--no-separability",
    "--no-progress",
]
EVAL = [
    "--n-advbench",
    "2",
    "--n-translation",
    "2",
    "--max-new-tokens",
    "3",
    "--batch-size",
    "2",
    "--no-progress",
]


def _sft_rows(tok, n: int = 8):
    from datasets import Dataset

    texts = [f"Guten Morgen {i}. -> Good morning {i}." for i in range(n)]
    enc = tok(texts, padding="max_length", max_length=16, truncation=True)
    return Dataset.from_dict(
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": enc["input_ids"]}
    )


def _args(cls, out: Path, lr: float, max_steps: int, **kw):
    return cls(
        output_dir=str(out),
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=0.25,
        per_device_train_batch_size=2,
        learning_rate=lr,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_only_model=True,
        disable_tqdm=True,
        **kw,
    )


@pytest.fixture(scope="module")
def study_tree(tmp_path_factory, tiny_llama) -> Path:
    """Three runs named as the study named its runs, each written by the library that trains it."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    root = tmp_path_factory.mktemp("study") / "ckpt"
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(0)

    # 1. HF Trainer, full fine-tuning, 8 steps: checkpoint-2/4/6/8, then save_model() and save_state() at the root
    out = root / "tiny-translation-full-lr5e-05-bs8"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    trainer = Trainer(model=model, args=_args(TrainingArguments, out, 5e-5, 8), train_dataset=_sft_rows(tok))
    trainer.train()
    trainer.save_model()
    trainer.save_state()

    # 2. TRL SFTTrainer + LoRA, 10 steps: checkpoint-3/6/9/10, and the step-10 adapter at the root (no save_state)
    out = root / "tiny-translation-lora-lr0.0001-bs8"
    data = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"Hallo {i}"}] for i in range(8)],
            "completion": [[{"role": "assistant", "content": f"Hello {i}"}] for i in range(8)],
        }
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    sft = SFTTrainer(
        model=model,
        args=_args(SFTConfig, out, 1e-4, 10, bf16=False, gradient_checkpointing=False, max_length=32),
        train_dataset=data,
        processing_class=tok,
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    )
    sft.train()
    sft.save_model()

    # 3. TRL DPOTrainer, full parameters, 4 steps, a run name that does not say "dpo"
    out = root / "pref-lr1e-05"
    pairs = Dataset.from_dict(
        {
            "prompt": [f"Translate: Hallo {i}" for i in range(8)],
            "chosen": [f"Hello {i}" for i in range(8)],
            "rejected": [f"Hallo {i}" for i in range(8)],
        }
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    dpo = DPOTrainer(
        model=model,
        args=_args(DPOConfig, out, 1e-5, 4, bf16=False, gradient_checkpointing=False, max_length=32),
        train_dataset=pairs,
        processing_class=tok,
    )
    dpo.train()
    dpo.save_model()
    return root


def test_study_layout_every_checkpoint_with_its_metadata(study_tree, tiny_llama):
    tree = discover(study_tree, base=str(tiny_llama))
    found = {(c.run, c.name): c for c in tree}
    full = "tiny-translation-full-lr5e-05-bs8"
    lora = "tiny-translation-lora-lr0.0001-bs8"
    got = {
        run: sorted((c.step, c.fraction) for (r, _), c in found.items() if r == run)
        for run in (full, lora, "pref-lr1e-05")
    }
    # each root model is its run's last checkpoint byte for byte: counted once, and said so
    assert got[full] == [(0, 0.0), (2, 0.25), (4, 0.5), (6, 0.75), (8, 1.0)]
    assert got[lora] == [(0, 0.0), (3, 0.3), (6, 0.6), (9, 0.9), (10, 1.0)]
    assert got["pref-lr1e-05"] == [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]
    assert sum("counted once" in note for note in tree.notes) == 3
    assert all(c.kind == "adapter" for (r, n), c in found.items() if r == lora and n != "base")
    assert {c.method for (r, _), c in found.items() if r == full} == {"full"}
    assert {c.method for (r, _), c in found.items() if r == lora} == {"lora"}
    assert {c.method for (r, _), c in found.items() if r == "pref-lr1e-05"} == {"dpo"}
    assert {c.lr for (r, _), c in found.items() if r == full} == {5e-5}
    assert {c.lr for (r, _), c in found.items() if r == lora} == {1e-4}
    assert found[("pref-lr1e-05", "checkpoint-4")].meta_source["method"].startswith("trainer_state.json")
    # without --base the full and DPO runs cannot name their base: named, not dropped; LoRA takes its own
    tree = discover(study_tree)
    assert {c.run for c in tree} == {lora}
    assert sorted(Path(s["path"]).name for s in tree.skipped) == sorted([full, "pref-lr1e-05"])
    assert all("--base" in s["reason"] for s in tree.skipped)


def test_study_layout_analyze_and_eval_find_every_checkpoint(study_tree, tiny_llama, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in study_tree.rglob("*") if p.is_file()}
    out = tmp_path / "analysis"
    assert (
        main(
            [
                "analyze",
                str(study_tree),
                "--base",
                str(tiny_llama),
                "--out",
                str(out),
                "--no-deltas",
                *ANALYZE,
            ]
        )
        == 0
    )
    rows = pd.read_csv(out / "checkpoints.csv")
    keys = set(zip(rows["run"], rows["step"], strict=True))
    assert len(keys) == 15  # 3 bases + 4 + 4 + 4 checkpoints
    want = {  # run -> (method, lr, [(step, fraction)])
        "tiny-translation-full-lr5e-05-bs8": (
            "full",
            5e-5,
            [(0, 0.0), (2, 0.25), (4, 0.5), (6, 0.75), (8, 1.0)],
        ),
        "tiny-translation-lora-lr0.0001-bs8": (
            "lora",
            1e-4,
            [(0, 0.0), (3, 0.3), (6, 0.6), (9, 0.9), (10, 1.0)],
        ),
        "pref-lr1e-05": ("dpo", 1e-5, [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]),
    }
    for run, (method, lr, steps) in want.items():
        got = rows[rows["run"] == run].sort_values("step")
        assert set(got["method"]) == {method} and got["lr"].tolist() == [lr] * 5
        assert list(zip(got["step"].astype(int), got["fraction"], strict=True)) == steps

    ev = tmp_path / "eval"
    assert main(["eval", str(study_tree), "--base", str(tiny_llama), "--out", str(ev), *EVAL]) == 0
    with open(ev / "behaviour.csv", newline="") as f:
        beh = [r for r in csv.DictReader(f) if r["metric"] == "refusal_rate"]
    assert {(r["run"], int(r["step"])) for r in beh} == keys
    for run, (method, lr, steps) in want.items():
        got = sorted(
            (int(r["step"]), float(r["fraction"]), r["method"], float(r["lr"]))
            for r in beh
            if r["run"] == run
        )
        assert got == [(step, fraction, method, lr) for step, fraction in steps]
    assert {p: p.stat().st_mtime_ns for p in study_tree.rglob("*") if p.is_file()} == before


@pytest.fixture(scope="module")
def plain_tree(tmp_path_factory, tiny_llama) -> Path:
    """step_N folders from a custom loop (save_pretrained) and a plain save_pretrained adapter with no step."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("plain") / "runs"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for step in (5, 10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(root / "custom-full-lr2e-05" / f"step_{step}")
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    model.save_pretrained(root / "custom-full-lr2e-05")  # a final model at the root that is no checkpoint
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(root / "my-adapter")
    shutil.copytree(
        tiny_llama, root / "base-model"
    )  # the base beside the runs is the runs' step 0, not a run
    return root


def test_step_folders_and_plain_adapters(plain_tree, tiny_llama):
    tree = discover(plain_tree, base=str(plain_tree / "base-model"))
    got = sorted((c.run, c.name, c.step, c.kind) for c in tree)
    assert any("base-model: the base of runs" in note for note in tree.notes)  # the --base beside the runs
    assert got == [
        ("custom-full-lr2e-05", "base", 0, "base"),
        ("custom-full-lr2e-05", FINAL, None, "full"),
        ("custom-full-lr2e-05", "step_10", 10, "full"),
        ("custom-full-lr2e-05", "step_5", 5, "full"),
        ("my-adapter", "base", 0, "base"),
        ("my-adapter", "my-adapter", None, "adapter"),
    ]
    # without --base: the adapter takes its base from adapter_config.json; the step_N run has none and is named
    tree = discover(plain_tree)
    assert {(c.run, c.name) for c in tree} >= {("my-adapter", "my-adapter")}
    assert [Path(s["path"]).name for s in tree.skipped] == ["custom-full-lr2e-05"]


def test_rows_without_a_step_join_their_behaviour(plain_tree, tmp_path):
    adapter = plain_tree / "my-adapter"
    ev = tmp_path / "eval"
    assert main(["eval", str(adapter), "--out", str(ev), *EVAL]) == 0
    out = tmp_path / "analysis"
    assert (
        main(["analyze", str(adapter), "--out", str(out), "--behaviour", str(ev / "behaviour.csv"), *ANALYZE])
        == 0
    )
    beh = pd.read_csv(out / "behaviour.csv")
    assert set(beh["checkpoint"]) == {"base", "my-adapter"}
    joined = pd.read_csv(out / "checkpoints.csv")
    row = joined[joined["checkpoint"] == "my-adapter"]
    assert len(row) == 1 and row["refusal_rate"].notna().all()


def _run_with_manifest(root: Path, tiny: Path, name: str, base: str, steps=(1, 2)) -> Path:
    from refusal_probe.models.manifest import RunManifest

    run = root / name
    for step in steps:
        shutil.copytree(tiny, run / f"checkpoint-{step}")
    RunManifest(
        run=name,
        method="full",
        base_model=base,
        learning_rate=1e-4,
        total_steps=max(steps),
        checkpoints={s: s / max(steps) for s in steps},
        complete=True,
    ).save(run)
    return run


def test_relative_paths_in_run_json_and_adapter_config_resolve_against_their_folder(
    tmp_path, tiny_llama, monkeypatch
):
    import json

    shutil.copytree(tiny_llama, tmp_path / "models" / "base")
    run = _run_with_manifest(tmp_path / "runs", tiny_llama, "full-lr1e-4", "../../models/base")
    monkeypatch.chdir("/")  # analysed from anywhere
    found = discover(str(run))
    assert found[0].path == (tmp_path / "models" / "base").resolve()
    adapter = tmp_path / "runs" / "lora" / "checkpoint-1"
    shutil.copytree(plain_adapter(tmp_path / "src-adapter", tiny_llama), adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "../../../models/base"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert discover(str(adapter.parent))[0].path == (tmp_path / "models" / "base").resolve()


def plain_adapter(path: Path, tiny: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(path)
    return path


def test_a_lone_checkpoint_is_never_a_base(tmp_path, tiny_llama):
    run = _run_with_manifest(tmp_path, tiny_llama, "full-lr1e-4", str(tiny_llama))
    found = discover(str(run / "checkpoint-2"))  # takes its base from the run's run.json
    assert [(c.kind, c.step) for c in found] == [("base", 0), ("full", 2)]
    assert found[0].path == tiny_llama and found[1].run == "full-lr1e-4"
    lone = tmp_path / "elsewhere" / "checkpoint-7"
    shutil.copytree(tiny_llama, lone)
    with pytest.raises(Exception, match="pass --base"):
        discover(str(lone))
    plain = discover(str(tiny_llama))  # a plain model folder: on its own, and said so
    assert [c.kind for c in plain] == ["base"] and "--base" in plain.notes[0]


def test_default_outputs_never_collide_and_outputs_are_never_inputs(tmp_path, tiny_llama):
    from refusal_probe.core.io import prepare_output
    from refusal_probe.models.tree import default_output

    a = _run_with_manifest(tmp_path / "runs", tiny_llama, "a", str(tiny_llama))
    b = _run_with_manifest(tmp_path / "runs", tiny_llama, "b", str(tiny_llama))
    shutil.copytree(tiny_llama, tmp_path / "models" / "m1")
    shutil.copytree(tiny_llama, tmp_path / "models" / "m2")
    outs = {
        default_output(str(p), "analysis")
        for p in (a, b, tmp_path / "models" / "m1", tmp_path / "models" / "m2")
    }
    assert len(outs) == 4
    assert default_output(str(a), "analysis") == a / "analysis"
    assert default_output(str(tmp_path / "models" / "m1"), "eval") == tmp_path / "models" / "m1-eval"
    # an output folder beside the runs is never read as a run
    prepare_output(tmp_path / "runs" / "my-results")
    (tmp_path / "runs" / "my-results" / "checkpoint-1").mkdir()
    tree = discover(str(tmp_path / "runs"))
    assert {c.run for c in tree} == {"a", "b"} and not tree.skipped
    with pytest.raises(Exception, match="checkpoint-1, which holds a model and is never written"):
        tree.check_output(a / "checkpoint-1" / "out")


def test_run_name_from_run_json_is_a_safe_path_component(tmp_path, tiny_llama):
    run = _run_with_manifest(tmp_path / "runs", tiny_llama, "x", str(tiny_llama))
    import json

    data = json.loads((run / "run.json").read_text())
    for evil in ("../../escape", "/abs/path", "..", "a/../../b"):
        data["run"] = evil
        (run / "run.json").write_text(json.dumps(data))
        names = {c.run for c in discover(str(run))}
        assert len(names) == 1
        name = names.pop()
        assert "/" not in name and name not in ("", ".", "..") and not name.startswith(".")


def test_dpo_recognised_from_the_root_trainer_state(study_tree, tiny_llama, tmp_path):
    """logging_steps larger than the checkpoint interval leaves the checkpoints without DPO logs; save_state() at
    the end writes the root trainer_state.json that holds them."""
    import json

    run = tmp_path / "run-b"
    shutil.copytree(study_tree / "pref-lr1e-05", run)
    final_state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    for state_file in run.glob("checkpoint-*/trainer_state.json"):
        state = json.loads(state_file.read_text())
        state["log_history"] = []
        state_file.write_text(json.dumps(state))
    assert {c.method for c in discover(str(run), base=str(tiny_llama))} == {"full"}  # nothing says DPO yet
    (run / "trainer_state.json").write_text(json.dumps(final_state))
    found = discover(str(run), base=str(tiny_llama))
    assert {c.method for c in found} == {"dpo"}
    assert found[1].meta_source["method"].startswith("trainer_state.json")
