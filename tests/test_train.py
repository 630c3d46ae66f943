"""Training: every method on a tiny random Llama (CPU, seconds), checkpoint fractions, manifest, resume, masking."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from refusal_probe.cli import main
from refusal_probe.core.errors import UserError
from refusal_probe.data import translation as tdata
from refusal_probe.models.manifest import RunManifest
from refusal_probe.train.base import load_for_training
from refusal_probe.train.callbacks import checkpoint_steps
from refusal_probe.train.config import (
    DpoPairs,
    KeepOptimizer,
    TrainConfig,
    build_config,
    choices_of,
    default_run_name,
)
from refusal_probe.train.lifecycle import run_status, settings_diff
from refusal_probe.train.runner import train
from refusal_probe.train.trainer import build_trainer, planned_steps

STEPS = [1, 2, 3, 4]


def tiny_config(model: Path, **kw) -> TrainConfig:
    # max_length 256: the tiny BPE tokenizer (384 tokens) spends 2-3 tokens per word of German
    base = dict(
        model=str(model), max_steps=4, per_device_batch_size=2, n_train=8, max_length=256, device="cpu"
    )
    return TrainConfig(**{**base, **kw})


# ---- pure parts ----


def test_checkpoint_steps_by_hand():
    assert checkpoint_steps([0.25, 0.5, 0.75, 1.0], 4) == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}
    # 2.5 -> 3 and 7.5 -> 8: half rounds up (Python's round() would give 2 and 8)
    assert checkpoint_steps([0.25, 0.5, 0.75, 1.0], 10) == {3: 0.25, 5: 0.5, 8: 0.75, 10: 1.0}
    assert checkpoint_steps([0.25, 0.5, 0.75, 1.0], 2) == {
        1: 0.5,
        2: 1.0,
    }  # a shared step keeps the larger one
    assert checkpoint_steps([0.01], 50) == {1: 0.01}  # never step 0
    assert checkpoint_steps([0.25, 1.0], 643) == {161: 0.25, 643: 1.0}


def test_planned_steps_by_hand():
    assert planned_steps(n_batches=4, grad_accum=1, epochs=1, max_steps=None) == 4
    assert (
        planned_steps(n_batches=9, grad_accum=2, epochs=1, max_steps=None) == 5
    )  # a partial accumulation counts
    assert planned_steps(n_batches=9, grad_accum=2, epochs=1.5, max_steps=None) == 8
    assert planned_steps(n_batches=100, grad_accum=1, epochs=1, max_steps=16) == 16


def test_run_name_follows_the_study():
    assert default_run_name("lora", 1e-4) == "lora-lr0.0001"
    assert default_run_name("dpo", 5e-6) == "dpo-lr5e-06"
    assert TrainConfig(method="full", learning_rate=5e-5).name == "full-lr5e-05"


def test_config_toml_then_per_method_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(
        '[base]\nmethod = "lora"\nlearning_rate = 1e-4\nlangs = ["de", "fr"]\nlora_targets = "qlora-all"\n'
        "[per_method.dpo]\nper_device_batch_size = 4\ngrad_accum = 2\n"
        '[grid]\nmethod = ["lora", "dpo"]\n'
    )
    cfg = build_config(f, {})
    assert (cfg.method, cfg.learning_rate, cfg.langs, cfg.per_device_batch_size) == (
        "lora",
        1e-4,
        ["de", "fr"],
        8,
    )
    assert cfg.lora_modules() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = build_config(f, {"method": "dpo", "learning_rate": "5e-6", "checkpoint_fractions": "0.5,1"})
    assert (cfg.per_device_batch_size, cfg.grad_accum, cfg.effective_batch_size) == (4, 2, 8)
    assert cfg.learning_rate == 5e-6 and cfg.checkpoint_fractions == [0.5, 1.0]
    assert build_config(None, {"n_train": "none", "bf16": "true"}).bf16 is True


def test_config_errors_name_the_setting(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("lerning_rate = 1e-4\n")
    with pytest.raises(UserError, match="did you mean 'learning_rate'"):
        build_config(f, {})
    with pytest.raises(UserError, match="max_steps='many'"):
        build_config(None, {"max_steps": "many"})
    with pytest.raises(UserError, match="checkpoint_fractions"):
        build_config(None, {"checkpoint_fractions": "0.5,1.5"})
    with pytest.raises(UserError, match="method='sft'"):
        TrainConfig(method="sft").validate()
    f.write_text("learning_rate = [\n")
    with pytest.raises(UserError, match="not valid TOML"):
        build_config(f, {})


# ---- completion-only loss ----


def test_loss_falls_on_answer_tokens_only(tiny_llama, tmp_path):
    cfg = tiny_config(
        tiny_llama, method="full", max_length=1024
    )  # nothing cut: the whole reference is labelled
    model, tok = load_for_training(cfg, tiny_llama)
    rows = tdata.translation_split(["de"], "train", n=2)
    examples = [tdata.sft_example(r) for r in rows]
    trainer = build_trainer(cfg, model, tok, examples, tmp_path / "run", [])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for i, ex in enumerate(examples):
        prompt_text = tok.apply_chat_template(ex["prompt"], tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        assert batch["input_ids"][i, :n].tolist() == prompt_ids  # the model's own template renders the prompt
        labels = batch["labels"][i]
        assert (
            labels[:n] == -100
        ).all()  # every prompt token (template, source text, assistant header) masked
        answer = labels[labels != -100]
        assert (
            tok.decode(answer) == rows[i]["ref"] + "<|eot_id|>"
        )  # the reference and the end of turn, nothing else
    # the study's LoRA scripts trained on the whole chat: the option turns the mask off
    trainer = build_trainer(
        tiny_config(tiny_llama, method="full", completion_only_loss=False),
        model,
        tok,
        examples,
        tmp_path / "run2",
        [],
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert (batch["labels"][0] != -100).all()


def test_qlora_base_is_nf4_with_double_quant_on_cpu(tiny_llama):
    import bitsandbytes as bnb

    model, _ = load_for_training(tiny_config(tiny_llama, method="qlora"), tiny_llama)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    assert (
        q.weight.quant_state.quant_type == "nf4" and q.weight.quant_state.nested
    )  # nested = double quantisation
    assert q.compute_dtype == torch.float32  # CPU has no bfloat16 units


# ---- every method end to end ----


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "dpo"])
def test_method_writes_checkpoints_at_fractions(method, tiny_llama, tmp_path):
    run_dir = train(tiny_config(tiny_llama, method=method), tmp_path / "runs")
    assert run_dir == tmp_path / "runs" / f"{method}-lr5e-05"
    ckpts = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    assert ckpts == STEPS
    m = RunManifest.load(run_dir)
    assert m.complete and m.method == method and m.total_steps == 4
    assert m.checkpoints == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}
    assert m.base_model == str(tiny_llama) and m.base_model_revision.startswith("sha256:")
    assert m.learning_rate == 5e-5 and m.hyperparameters["effective_batch_size"] == 2
    assert m.hyperparameters["load_in_4bit"] is (method == "qlora")
    assert m.data["train"]["rows"] == 8 and len(m.data["train"]["rows_sha256"]) == 64
    assert {"torch", "transformers", "trl", "peft"} <= set(m.versions) and m.wall_time_s > 0
    last = run_dir / "checkpoint-4"
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 4
    assert (last / "tokenizer.json").is_file() and (last / "tokenizer_config.json").is_file()
    assert not list(run_dir.glob("checkpoint-*/optimizer.pt"))  # complete: no resume state left
    base = load_file(tiny_llama / "model.safetensors")
    if method in ("lora", "qlora"):
        assert (last / "adapter_config.json").is_file() and not (last / "model.safetensors").exists()
        adapter = load_file(last / "adapter_model.safetensors")
        lora_b = [v for k, v in adapter.items() if "lora_B" in k]
        assert lora_b and all(v.dtype == torch.float32 for v in adapter.values())
        assert any(v.abs().max() > 0 for v in lora_b)  # B starts at zero: training moved it
        cfg = json.loads((last / "adapter_config.json").read_text())
        assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"] and cfg["r"] == 8
    else:
        assert (last / "model.safetensors").is_file() and not (last / "adapter_config.json").exists()
        tuned = load_file(last / "model.safetensors")
        key = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(tuned[key], base[key])
    if method == "dpo":
        assert m.data["train"]["dpo_pairs"] == "wmt" and m.data["train"]["source"] == "wmt22+wmt23"

    from refusal_probe.models.tree import discover

    found = discover(tmp_path / "runs")
    assert [(c.kind, c.step, c.fraction) for c in found][:2] == [
        ("base", 0, 0.0),
        ("adapter" if method in ("lora", "qlora") else "full", 1, 0.25),
    ]
    assert found[-1].quantized is (method == "qlora")


# ---- resume ----


class StopAfterSave(TrainerCallback):
    """Simulates a kill right after checkpoint ``step`` was written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_to_the_same_weights_and_complete_run_is_skipped(
    tiny_llama, tmp_path, capsys
):
    cfg = tiny_config(tiny_llama, method="lora")
    reference = train(cfg, tmp_path / "straight")

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, callbacks=[StopAfterSave(2)])
    run_dir = out / cfg.name
    assert run_status(run_dir) == ("resume", run_dir / "checkpoint-2")
    assert not RunManifest.load(run_dir).complete
    assert (run_dir / "checkpoint-2" / "optimizer.pt").is_file() and not (
        run_dir / "checkpoint-1" / "optimizer.pt"
    ).exists()
    first_save = (run_dir / "checkpoint-1" / "adapter_model.safetensors").stat().st_mtime_ns

    with pytest.raises(UserError, match="started with other settings \\(seed 42 -> 1\\)"):
        train(tiny_config(tiny_llama, method="lora", seed=1), out)

    train(cfg, out)
    assert "resuming from checkpoint-2" in capsys.readouterr().out
    assert (run_dir / "checkpoint-1" / "adapter_model.safetensors").stat().st_mtime_ns == first_save
    assert RunManifest.load(run_dir).complete
    a = load_file(reference / "checkpoint-4" / "adapter_model.safetensors")
    b = load_file(run_dir / "checkpoint-4" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    done = (run_dir / "checkpoint-4" / "adapter_model.safetensors").stat().st_mtime_ns
    assert train(cfg, out) == run_dir
    assert "complete, skipped" in capsys.readouterr().out
    assert (run_dir / "checkpoint-4" / "adapter_model.safetensors").stat().st_mtime_ns == done


def test_unfinished_checkpoint_is_removed_before_resume(tiny_llama, tmp_path):
    cfg = tiny_config(tiny_llama, method="lora", checkpoint_fractions=[0.5, 1.0])
    out = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, callbacks=[StopAfterSave(2)])
    run_dir = out / cfg.name
    half = run_dir / "checkpoint-4"
    shutil.copytree(run_dir / "checkpoint-2", half)
    (half / "trainer_state.json").unlink()  # as if killed while writing checkpoint-4
    train(cfg, out)
    assert json.loads((half / "trainer_state.json").read_text())["global_step"] == 4


# ---- CLI and options ----


def test_cli_trains_dpo_through_lora_on_policy(tiny_llama, tmp_path):
    out = tmp_path / "runs"
    rc = main(
        [
            "train",
            "--model",
            str(tiny_llama),
            "--method",
            "dpo",
            "--dpo-lora",
            "--dpo-pairs",
            "on-policy",
            "--max-steps",
            "2",
            "--per-device-batch-size",
            "2",
            "--n-train",
            "4",
            "--max-length",
            "256",
            "--checkpoint-fractions",
            "0.5,1",
            "--device",
            "cpu",
            "--learning-rate",
            "1e-4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    run_dir = out / "dpo-lr0.0001"
    assert (run_dir / "checkpoint-2" / "adapter_config.json").is_file()
    m = RunManifest.load(run_dir)
    assert m.checkpoints == {1: 0.5, 2: 1.0} and m.data["train"]["dpo_pairs"] == "on-policy"
    cache = Path(m.data["train"]["on_policy_cache"])
    assert cache.parent == out / ".cache"
    pairs = tdata.read_jsonl(cache)
    assert pairs and all(p["chosen"] == p["ref"] and p["rejected"] != p["ref"] for p in pairs)


def test_on_policy_pairs_are_the_models_greedy_answers_and_cached(tiny_llama, tmp_path):
    from refusal_probe.models.source import load_model
    from refusal_probe.train.onpolicy import greedy_answers, on_policy_pairs

    model, tok = load_model(tiny_llama)
    rows = tdata.translation_split(["de", "fr"], "train", n=3)
    cache = tmp_path / ".cache" / "p.jsonl"
    pairs = on_policy_pairs(rows, model, tok, "seed", cache, max_new_tokens=8)
    alone = greedy_answers(
        model, tok, [rows[1]["src"]], max_new_tokens=8
    )  # batching does not change the answer
    assert pairs[1]["rejected"] == alone[0] and pairs[1]["chosen"] == rows[1]["ref"]
    assert on_policy_pairs(rows, None, None, "seed", cache, max_new_tokens=8) == pairs  # read back, no model


def test_wmt_pairs_need_german(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="German->English only"):
        train(tiny_config(tiny_llama, method="dpo", langs=["fr"]), tmp_path)


def test_adapter_as_base_is_refused(tiny_llama, tmp_path):
    lora = train(
        tiny_config(tiny_llama, method="lora", max_steps=1, checkpoint_fractions=[1.0]), tmp_path / "a"
    )
    with pytest.raises(UserError, match="is a PEFT adapter"):
        train(tiny_config(lora / "checkpoint-1", method="full"), tmp_path / "b")


# ---- settings that changed, closed vocabularies ----


def test_settings_diff_ignores_execution_only_and_unrecorded_settings():
    old = {"learning_rate": 1e-4, "device": "cuda", "grad_accum": 2, "retired": 1, "seed": 42}
    new = {"learning_rate": 5e-5, "device": "cpu", "grad_accum": 1, "added": 3, "seed": 42}
    assert settings_diff(old, new) == [("learning_rate", 1e-4, 5e-5)]


def test_scheduler_and_optimizer_names_come_from_transformers():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for name in SchedulerType:
        assert build_config(None, {"lr_scheduler": name.value}).lr_scheduler == name.value
    assert build_config(None, {"optim": OptimizerNames.SGD.value}).optim == "sgd"
    with pytest.raises(UserError, match=r"did you mean 'cosine'.*\(--lr-scheduler\)"):
        build_config(None, {"lr_scheduler": "cosin"})
    with pytest.raises(
        UserError,
        match=r"optim='adam' is invalid \(did you mean 'adamw_torch'\?\).*OptimizerNames \(--optim\)",
    ):
        build_config(None, {"optim": "adam"})


def test_cli_choices_are_the_vocabularies():
    import argparse

    from refusal_probe.cli import build_parser
    from refusal_probe.models.manifest import METHODS
    from refusal_probe.models.quant import QUANT_TYPES

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    choices = {a.dest: a.choices for a in sub.choices["train"]._actions}
    assert choices["cfg_method"] == METHODS and choices["cfg_qlora_quant_type"] == QUANT_TYPES
    assert choices["cfg_dpo_pairs"] == choices_of(DpoPairs) == ("auto", "wmt", "on-policy")
    assert choices["cfg_keep_optimizer"] == choices_of(KeepOptimizer)
    with pytest.raises(UserError, match="dpo_pairs='offline'"):
        TrainConfig(dpo_pairs="offline").validate()


def test_complete_run_with_other_settings_is_refused_same_settings_skipped(tiny_llama, tmp_path, capsys):
    out = tmp_path / "runs"
    one = dict(method="lora", max_steps=1, checkpoint_fractions=[1.0], run_name="r")
    run_dir = train(tiny_config(tiny_llama, **one), out)
    done = (run_dir / "checkpoint-1" / "adapter_model.safetensors").stat().st_mtime_ns
    entries = sorted(p.name for p in run_dir.iterdir())
    capsys.readouterr()
    # execution-only settings may differ; the same settings are skipped
    assert train(tiny_config(tiny_llama, **one, logging_steps=5, keep_optimizer="all"), out) == run_dir
    assert "complete, skipped" in capsys.readouterr().out
    with pytest.raises(
        UserError,
        match=r"runs/r: a complete run with other settings is there "
        r"\(learning_rate 5e-05 -> 0.0001, seed 42 -> 1\); pass another --run-name",
    ):
        train(tiny_config(tiny_llama, **one, learning_rate=1e-4, seed=1), out)
    other_base = shutil.copytree(tiny_llama, tmp_path / "other-base")
    with pytest.raises(UserError, match=f"model '{tiny_llama}' -> '{other_base}'"):
        train(tiny_config(other_base, **one), out)
    with pytest.raises(UserError, match="the run folder would lie inside .*checkpoint-1.* never written"):
        train(tiny_config(tiny_llama, **one), run_dir / "checkpoint-1")
    assert (run_dir / "checkpoint-1" / "adapter_model.safetensors").stat().st_mtime_ns == done
    assert sorted(p.name for p in run_dir.iterdir()) == entries and "run.json" in entries


def test_qlora_fp4_run_is_read_back_as_fp4_over_its_recorded_base(tiny_llama, tmp_path, monkeypatch):
    from refusal_probe.models.quant import QuantSpec
    from refusal_probe.models.tree import discover

    monkeypatch.chdir(tiny_llama.parent)  # the base given relative to the working directory
    cfg = tiny_config("./model", method="qlora", qlora_quant_type="fp4", max_steps=2)
    run_dir = train(dataclasses.replace(cfg, checkpoint_fractions=[0.5, 1.0]), tmp_path / "runs")
    m = RunManifest.load(run_dir)
    assert m.base_model == str(tiny_llama.resolve()) and m.base_model_spec == "./model"
    hp = m.hyperparameters
    assert (hp["qlora_quant_type"], hp["qlora_double_quant"], hp["load_in_4bit"]) == ("fp4", True, True)

    monkeypatch.chdir(tmp_path)  # analysed from elsewhere: the base still resolves
    found = discover(str(run_dir))
    assert [c.name for c in found] == ["base", "checkpoint-1", "checkpoint-2"]
    assert Path(found[0].path).resolve() == tiny_llama.resolve()
    assert found[-1].quant == QuantSpec("fp4", True) and found[-1].quant.quant_type == "fp4"
