"""Weight deltas streamed from disk (full checkpoints) and from LoRA factors, against in-memory dense computations."""

from __future__ import annotations

import json
import math
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from refusal_probe.core.errors import UserError
from refusal_probe.probe import weights as W
from refusal_probe.probe.measures import unit
from refusal_probe.testing.tiny import make_tiny_model

N_LAYERS, HIDDEN = 4, 64
BLOCK_MODULES = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
}


def _state(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _directions(seed: int = 5) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randn(HIDDEN, generator=g) for i in range(N_LAYERS)}


def _by_key(rows: list[dict]) -> dict[tuple[int, str, str], float]:
    out = {(r["layer"], r["module"], r["metric"]): r["value"] for r in rows}
    assert len(out) == len(rows), "duplicate rows"
    return out


def _dense_expected(
    base: dict, ckpt: dict, directions: dict[int, torch.Tensor]
) -> dict[tuple[int, str, str], float]:
    """The same metrics computed the obvious way, in memory, from whole float64 tensors."""
    want = {}
    for key, b in base.items():
        loc = W.locate(key)
        if loc is None or b.dim() != 2 or key not in ckpt:
            continue
        layer, module = loc
        d = ckpt[key].double() - b.double()
        want[(layer, module, "delta_fro")] = float(d.norm())
        want[(layer, module, "base_fro")] = float(b.double().norm())
        want[(layer, module, "rel_delta")] = float(d.norm() / b.double().norm())
        if module in W.RESIDUAL_WRITERS and layer in directions:
            along = float((unit(directions[layer]) @ d).norm())
            want[(layer, module, "delta_along_refusal")] = along
            want[(layer, module, "delta_along_refusal_rel")] = along / float(d.norm())
    return want


def _assert_rows_match(rows: list[dict], want: dict, rel: float = 1e-6) -> None:
    got = _by_key(rows)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=rel, abs=1e-12), k


@pytest.fixture(scope="module")
def perturbed(tiny_llama, tmp_path_factory):
    """A full checkpoint of tiny_llama with every weight perturbed, as one file and sharded; layer 1's o_proj
    update lies exactly along the layer-1 refusal direction."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("perturbed")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    dirs = _directions()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    single, sharded = root / "checkpoint-10", root / "sharded"
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="50KB")
    # replace layer 1 o_proj by base + outer(r_hat, v): an update that writes only along r_hat
    state = load_file(single / "model.safetensors")
    base_state = _state(tiny_llama)
    key = "model.layers.1.self_attn.o_proj.weight"
    r_hat = unit(dirs[1]).float()
    state[key] = base_state[key] + 0.05 * torch.outer(r_hat, torch.randn(HIDDEN, generator=g))
    save_file(state, single / "model.safetensors", metadata={"format": "pt"})
    return single, sharded, dirs


def test_full_deltas_equal_dense_in_memory(tiny_llama, perturbed):
    ckpt, _, dirs = perturbed
    rows = W.full_deltas(tiny_llama, ckpt, dirs, progress=False)
    want = _dense_expected(_state(tiny_llama), _state(ckpt), dirs)
    _assert_rows_match(rows, want)
    got = _by_key(rows)
    modules = {(r["layer"], r["module"]) for r in rows}
    assert modules == {(i, m) for i in range(N_LAYERS) for m in BLOCK_MODULES} | {
        (-1, "embed_tokens"),
        (-1, "lm_head"),
    }
    along = {(r["layer"], r["module"]) for r in rows if r["metric"] == "delta_along_refusal"}
    assert along == {(i, m) for i in range(N_LAYERS) for m in ("self_attn.o_proj", "mlp.down_proj")}
    # the rank-one update outer(r_hat, v) writes entirely along r_hat; a random one writes ~1/sqrt(d) of itself
    assert got[(1, "self_attn.o_proj", "delta_along_refusal_rel")] == pytest.approx(1.0, rel=1e-6)
    assert got[(2, "self_attn.o_proj", "delta_along_refusal_rel")] < 0.4
    assert got[(0, "mlp.down_proj", "rel_delta")] > 0


def test_sharded_and_chunked_streaming_give_the_same_rows(tiny_llama, perturbed, monkeypatch):
    _, sharded, dirs = perturbed
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    want = _dense_expected(_state(tiny_llama), _state(sharded), dirs)
    _assert_rows_match(W.full_deltas(tiny_llama, sharded, dirs, progress=False), want)
    # force row-sliced reading of every tensor (as for a real embedding matrix)
    monkeypatch.setattr(W, "STREAM_ELEMENTS", 1000)
    _assert_rows_match(W.full_deltas(tiny_llama, sharded, dirs, progress=False), want)


def test_base_against_itself_is_zero_and_files_are_only_read(tiny_llama, tmp_path):
    ro = tmp_path / "ro"
    shutil.copytree(tiny_llama, ro)
    for f in ro.iterdir():
        f.chmod(stat.S_IRUSR)
    before = {f.name: f.read_bytes() for f in ro.iterdir()}
    rows = W.full_deltas(ro, ro, _directions(), progress=False)
    assert {r["value"] for r in rows if r["metric"] in ("delta_fro", "rel_delta", "delta_along_refusal")} == {
        0.0
    }
    rel = [r["value"] for r in rows if r["metric"] == "delta_along_refusal_rel"]
    assert len(rel) == 2 * N_LAYERS and all(math.isnan(v) for v in rel)  # 0/0 for o_proj and down_proj
    assert {f.name: f.read_bytes() for f in ro.iterdir()} == before


def test_without_directions_no_along_rows(tiny_llama, perturbed):
    rows = W.full_deltas(tiny_llama, perturbed[0], None, progress=False)
    assert {r["metric"] for r in rows} == {"delta_fro", "base_fro", "rel_delta"}
    # only some layers given: along rows only there
    rows = W.full_deltas(tiny_llama, perturbed[0], {2: torch.ones(HIDDEN)}, progress=False)
    assert {r["layer"] for r in rows if r["metric"] == "delta_along_refusal"} == {2}


# ------------------------------------------------------------------------------------------------ errors


def test_truncated_checkpoint_names_the_file(tiny_llama, tmp_path):
    bad = tmp_path / "checkpoint-5"
    shutil.copytree(tiny_llama, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"checkpoint-5/model\.safetensors.*truncated or corrupt"):
        W.full_deltas(tiny_llama, bad, progress=False)


def test_shape_mismatch_names_both_dirs_and_tensor(tiny_llama, tmp_path):
    other = make_tiny_model(tmp_path / "other", arch="llama", hidden=32)
    with pytest.raises(UserError) as err:
        W.full_deltas(tiny_llama, other, progress=False)
    msg = str(err.value)
    assert str(other) in msg and str(tiny_llama) in msg and "has shape" in msg and "--base" in msg
    assert "\n" not in msg


def test_missing_tensor_is_a_user_error(tiny_llama, tmp_path):
    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, bad)
    state = load_file(bad / "model.safetensors")
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model\.layers\.2\.mlp\.up_proj\.weight is missing"):
        W.full_deltas(tiny_llama, bad, progress=False)


def test_direction_of_wrong_size_and_not_a_model_dir(tiny_llama, perturbed, tmp_path):
    with pytest.raises(UserError, match="direction for layer 0 has 10 entries"):
        W.full_deltas(tiny_llama, perturbed[0], {0: torch.ones(10)}, progress=False)
    with pytest.raises(UserError, match="no model.safetensors"):
        W.full_deltas(tiny_llama, tmp_path, progress=False)


# ------------------------------------------------------------------------------------------------ LoRA


def _make_adapter(base: Path, out: Path, *, use_rslora: bool, seed: int = 3, **extra) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
        **extra,
    )
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out)
    return out


def _merged_expected(base: Path, adapter: Path, directions) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged_state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    base_state = _state(base)
    changed = {k: v for k, v in merged_state.items() if k in base_state and not torch.equal(v, base_state[k])}
    return _dense_expected(base_state, changed, directions), set(changed)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_deltas_from_factors_equal_merged_dense(tiny_qwen, tmp_path, use_rslora):
    adapter = _make_adapter(
        tiny_qwen,
        tmp_path / "adapter",
        use_rslora=use_rslora,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"layers.1.self_attn.o_proj": 32},
        modules_to_save=["lm_head"],
    )
    dirs = _directions()
    rows = W.adapter_deltas(adapter, tiny_qwen, dirs, progress=False)
    want, changed = _merged_expected(tiny_qwen, adapter, dirs)
    assert len(changed) == 5 * N_LAYERS + 1  # q,k,v,o,down in 4 layers + lm_head
    # merged weights are float32 (rounding ~1e-7 of |W|); the factor form is exact in float64
    _assert_rows_match(rows, want, rel=1e-5)
    got = _by_key(rows)
    assert (-1, "lm_head", "delta_fro") in got
    assert (3, "mlp.down_proj", "delta_along_refusal") in got
    assert W.weight_deltas(adapter, tiny_qwen, dirs, progress=False) == rows


def test_dora_and_other_variants_are_refused(tiny_qwen, tmp_path):
    adapter = _make_adapter(tiny_qwen, tmp_path / "dora", use_rslora=False, use_dora=True)
    with pytest.raises(UserError, match="DoRA"):
        W.adapter_deltas(adapter, tiny_qwen, progress=False)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(use_dora=False, peft_type="IA3")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="IA3.*unsupported"):
        W.adapter_deltas(adapter, tiny_qwen, progress=False)


def test_adapter_over_the_wrong_base_is_a_user_error(tiny_qwen, tmp_path):
    adapter = _make_adapter(tiny_qwen, tmp_path / "adapter", use_rslora=False)
    other = make_tiny_model(tmp_path / "other", arch="qwen2", hidden=32)
    with pytest.raises(UserError, match=r"does not match base .*layers\.0\.\S+\.weight has shape"):
        W.adapter_deltas(adapter, other, progress=False)
    with pytest.raises(UserError, match="is a LoRA adapter"):
        W.full_deltas(tiny_qwen, adapter, progress=False)


def test_cached_base_norms_follow_a_changed_base_file(tiny_qwen, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_qwen, base)
    adapter = _make_adapter(base, tmp_path / "adapter", use_rslora=False)
    key = "model.layers.0.self_attn.q_proj.weight"
    before = _by_key(W.adapter_deltas(adapter, base, progress=False))[(0, "self_attn.q_proj", "base_fro")]
    assert before == pytest.approx(float(_state(base)[key].double().norm()), rel=1e-9)
    state = load_file(base / "model.safetensors")
    state[key] = 2 * state[key]
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    after = _by_key(W.adapter_deltas(adapter, base, progress=False))[(0, "self_attn.q_proj", "base_fro")]
    assert after == pytest.approx(2 * before, rel=1e-9)


def test_gpt2_conv1d_weights_use_their_output_axis(tmp_path):
    """GPT-2 stores linear weights [d_in, d_out]: what c_proj writes along r_hat is ||dW @ r_hat||."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape))
    model.save_pretrained(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(4)
    dirs = {i: torch.randn(32, generator=g) for i in range(2)}
    got = _by_key(W.full_deltas(tmp_path / "base", tmp_path / "ckpt", dirs, progress=False))
    base, ckpt = _state(tmp_path / "base"), _state(tmp_path / "ckpt")
    for layer in range(2):
        for module in ("attn.c_proj", "mlp.c_proj"):
            key = f"transformer.h.{layer}.{module}.weight"
            d = ckpt[key].double() - base[key].double()
            assert d.shape[1] == 32
            want = float((d @ unit(dirs[layer])).norm())
            assert got[(layer, module, "delta_along_refusal")] == pytest.approx(want, rel=1e-9)
        assert (layer, "mlp.c_fc", "delta_fro") in got and (
            layer,
            "mlp.c_fc",
            "delta_along_refusal",
        ) not in got
    assert (-1, "wte", "delta_fro") in got  # lm_head is tied to wte and not saved


@pytest.mark.parametrize("out_axis", [0, 1])
def test_streamed_delta_is_the_dense_math_over_any_chunking(out_axis):
    """The accumulation full_deltas runs (measures.StreamedDelta) equals the dense reference functions, whatever
    the row chunks."""
    from refusal_probe.probe import measures as pm

    g = torch.Generator().manual_seed(3)
    base = torch.randn(37, 29, generator=g, dtype=torch.float32)
    new = base + 1e-3 * torch.randn(37, 29, generator=g, dtype=torch.float32)
    r_hat = unit(torch.randn(base.shape[out_axis], generator=g, dtype=torch.float64))
    dense = new.double() - base.double()
    for rows in (1, 5, 37):
        acc = pm.StreamedDelta(r_hat, out_axis)
        for start in range(0, base.shape[0], rows):
            acc.add(start, base[start : start + rows], new[start : start + rows])
        assert acc.delta_sq == pytest.approx(float((dense**2).sum()), rel=1e-12)
        assert acc.delta_sq == pytest.approx(pm.difference_frobenius(new, base) ** 2, rel=1e-12)
        assert acc.base_sq == pytest.approx(pm.sum_of_squares(base), rel=1e-12)
        assert acc.along == pytest.approx(pm.dense_delta_along(dense, r_hat, out_axis), rel=1e-10)
    assert pm.StreamedDelta().along is None
