"""Residual-stream interventions: ablation leaves no component along the direction, addition shifts by exactly the
vector, and the model is bit-for-bit unchanged afterwards (also after an exception)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from refusal_probe.core.errors import UserError
from refusal_probe.models.handle import decoder_layers
from refusal_probe.models.source import load_model
from refusal_probe.probe.hooks import ablate, add, project_out, unit_vector


@pytest.fixture(scope="module", params=["llama", "qwen"])
def model_tok(request, tiny_llama, tiny_qwen):
    path = tiny_llama if request.param == "llama" else tiny_qwen
    return load_model(path)


def _inputs(tokenizer, texts=("Tell me a joke about cats", "Hi")):
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)  # left padding from load_model
    return enc["input_ids"], enc["attention_mask"]


def _logits(model, ids, mask):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits


@contextlib.contextmanager
def _record(model):
    """Record each block's input (resid_pre) and the last block's output, as seen after earlier hooks ran."""
    layers = decoder_layers(model)
    seen: dict[str, list[torch.Tensor]] = {}

    def pre(i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(f"pre{i}", []).append(h.detach().clone())

        return hook

    def post(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        seen.setdefault("out", []).append(h.detach().clone())

    def mid(i):  # resid_mid: the input of the post-attention norm, what the MLP reads (Llama/Qwen2 blocks)
        def hook(module, args):
            seen.setdefault(f"mid{i}", []).append(args[0].detach().clone())

        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(post))
    handles += [b.post_attention_layernorm.register_forward_pre_hook(mid(i)) for i, b in enumerate(layers)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_project_out_hand_values():
    h = torch.tensor([[3.0, 4.0], [1.0, -2.0]])
    u = unit_vector(torch.tensor([2.0, 0.0]))
    assert torch.equal(project_out(h, u), torch.tensor([[0.0, 4.0], [0.0, -2.0]]))
    u45 = unit_vector(torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(project_out(h, u45), torch.tensor([[-0.5, 0.5], [1.5, -1.5]]))
    out = project_out(h.to(torch.bfloat16), u)
    assert out.dtype == torch.bfloat16 and torch.equal(out.float(), torch.tensor([[0.0, 4.0], [0.0, -2.0]]))


def test_unit_vector_rejects_zero_and_nan():
    with pytest.raises(UserError):
        unit_vector(torch.zeros(4))
    with pytest.raises(UserError):
        unit_vector(torch.tensor([1.0, float("nan")]))
    assert torch.allclose(
        unit_vector(torch.tensor([0.0, 3.0, 4.0])), torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64)
    )


def test_ablate_zeroes_projection_everywhere_and_restores(model_tok):
    model, tok = model_tok
    ids, mask = _inputs(tok)
    before = _logits(model, ids, mask)
    direction = torch.randn(
        model.config.hidden_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    u = (direction / direction.norm()).float()
    with ablate(model, direction * 7.0), _record(model) as seen:
        during = _logits(model, ids, mask)
    n_layers = len(decoder_layers(model))
    assert len([k for k in seen if k.startswith("pre")]) == n_layers
    for name, tensors in seen.items():
        h = tensors[0]
        proj = (h @ u).abs().max().item()
        assert proj < 1e-5 * max(1.0, h.abs().max().item()), (
            f"{name}: projection {proj} left on the direction"
        )
    assert not torch.equal(during, before)  # the intervention did something
    assert _no_hooks(model)
    assert torch.equal(_logits(model, ids, mask), before)


def test_block_outputs_alone_leave_the_attention_write_in_resid_mid(model_tok):
    """Why ablate also hooks attention/MLP outputs (Arditi et al.): without them the MLP reads the direction."""
    model, tok = model_tok
    ids, mask = _inputs(tok)
    direction = torch.randn(
        model.config.hidden_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    u = (direction / direction.norm()).float()
    with ablate(model, direction, sublayers=False), _record(model) as seen:
        _logits(model, ids, mask)
    assert max((seen[f"mid{i}"][0] @ u).abs().max().item() for i in range(len(decoder_layers(model)))) > 1e-3
    for i in range(len(decoder_layers(model))):  # resid_pre is still clean
        assert (seen[f"pre{i}"][0] @ u).abs().max().item() < 1e-5


def test_add_shifts_resid_pre_by_exactly_the_vector(model_tok):
    model, tok = model_tok
    ids, mask = _inputs(tok)
    before = _logits(model, ids, mask)
    with _record(model) as plain:
        _logits(model, ids, mask)
    layer = 2
    vector = torch.randn(
        model.config.hidden_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    with add(model, vector, layer), _record(model) as seen:
        _logits(model, ids, mask)
    for i in range(layer):
        assert torch.equal(seen[f"pre{i}"][0], plain[f"pre{i}"][0])
    shift = seen[f"pre{layer}"][0] - plain[f"pre{layer}"][0]
    torch.testing.assert_close(shift, vector.float().expand_as(shift), atol=1e-5, rtol=0)
    assert not torch.equal(seen[f"pre{layer + 1}"][0], plain[f"pre{layer + 1}"][0])
    assert _no_hooks(model)
    assert torch.equal(_logits(model, ids, mask), before)


def test_hooks_removed_after_exception(model_tok):
    model, tok = model_tok
    ids, mask = _inputs(tok)
    before = _logits(model, ids, mask)
    d = model.config.hidden_size
    with pytest.raises(RuntimeError, match="boom"), ablate(model, torch.ones(d)):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), add(model, torch.ones(d), 1):
        raise RuntimeError("boom")
    assert _no_hooks(model)
    assert torch.equal(_logits(model, ids, mask), before)


def test_ablate_holds_at_every_step_of_batched_generate(model_tok):
    model, tok = model_tok
    ids, mask = _inputs(tok, ("Write a poem about the sea and the sky", "Hello"))
    direction = torch.randn(
        model.config.hidden_size, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    u = (direction / direction.norm()).float()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.inference_mode():
        plain = model.generate(input_ids=ids, attention_mask=mask, **kw)
        with ablate(model, direction), _record(model) as seen:
            ablated = model.generate(input_ids=ids, attention_mask=mask, **kw)
        again = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert ablated.shape == plain.shape == (2, ids.shape[1] + 5)
    assert len(seen["out"]) == 5  # prefill + 4 cached decode steps, each hooked
    assert all(h.shape[0] == 2 for h in seen["out"])
    assert max((h @ u).abs().max().item() for h in seen["out"]) < 1e-4
    assert torch.equal(again, plain)


def test_bad_inputs_are_user_errors(model_tok):
    model, _ = model_tok
    d = model.config.hidden_size
    with pytest.raises(UserError, match="out of range"), add(model, torch.ones(d), 99):
        pass
    with pytest.raises(UserError, match="dimensions"), ablate(model, torch.ones(d + 1)):
        pass
    with pytest.raises(UserError, match="dimensions"), add(model, torch.ones(d + 1), 0):
        pass
    assert _no_hooks(model)
