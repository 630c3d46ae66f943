"""Post-instruction tokens from the model's own template, and resid_pre capture (hooks and transformer-lens)."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from refusal_probe import data
from refusal_probe.core.errors import UserError
from refusal_probe.core.template import format_prompts, post_instruction_ids, tokenize_prompts
from refusal_probe.probe.activations import capture, decoder_layers

PROMPTS = [
    "Write a poem about the sea",
    "How do I bake bread?",
    "List three colours",
    "Explain how a bicycle works, in detail, step by step, for a child",
    "Hi",
    "What is the capital of France?",
    "Tell me a joke about cats and dogs living together",
]


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return model, tok


@pytest.fixture(params=["llama", "qwen2"])
def tiny(request, tiny_llama, tiny_qwen):
    return _load(tiny_llama if request.param == "llama" else tiny_qwen)


# ---------------------------------------------------------------- template


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("llama", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
        ("qwen2", "<|im_end|>\n<|im_start|>assistant\n"),
    ],
)
def test_post_instruction_tokens_are_the_template_tail(arch, expected, tiny_llama, tiny_qwen):
    _, tok = _load(tiny_llama if arch == "llama" else tiny_qwen)
    ids = post_instruction_ids(tok)
    assert tok.decode(ids) == expected
    assert post_instruction_ids(tok, system="Be brief.") == ids


def test_formatted_prompts_end_with_post_instruction_ids_and_have_one_bos(tiny_llama):
    _, tok = _load(tiny_llama)
    texts = format_prompts(tok, PROMPTS, system="You are terse.")
    assert all("You are terse." in t and t.startswith("<|begin_of_text|>") for t in texts)
    ids, post = tokenize_prompts(tok, PROMPTS)
    assert len(ids) == len(PROMPTS)
    for seq in ids:
        assert seq[-len(post) :] == post
        assert seq.count(tok.bos_token_id) == 1 and seq[0] == tok.bos_token_id


def test_tokenizer_without_chat_template_is_a_user_error(tiny_llama):
    _, tok = _load(tiny_llama)
    tok.chat_template = None
    with pytest.raises(UserError, match="chat_template"):
        post_instruction_ids(tok)


# ---------------------------------------------------------------- capture


def _reference(model, tok, prompts):
    """Unpadded, one prompt at a time, from HF hidden_states (index l = input of block l)."""
    ids, post = tokenize_prompts(tok, prompts)
    n_layers = len(decoder_layers(model))
    out = torch.zeros(len(prompts), n_layers, len(post), model.config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        for i, seq in enumerate(ids):
            hidden = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
            for layer in range(n_layers):
                out[i, layer] = hidden[layer][0, -len(post) :].double()
    return out


def test_hook_capture_matches_unpadded_hidden_states(tiny):
    model, tok = tiny
    acts = capture(model, tok, PROMPTS, batch_size=3, keep=True, progress=False)
    ref = _reference(model, tok, PROMPTS)
    n_post = len(post_instruction_ids(tok))
    assert acts.mean.dtype == torch.float64 and acts.mean.shape == (4, n_post, 64)
    assert acts.positions == list(range(-n_post, 0)) and acts.n == len(PROMPTS)
    assert acts.per_prompt.dtype == torch.float32 and acts.per_prompt.shape == (len(PROMPTS), 4, n_post, 64)
    torch.testing.assert_close(acts.per_prompt.double(), ref, atol=1e-5, rtol=0)  # original prompt order
    torch.testing.assert_close(acts.mean, ref.mean(0), atol=1e-5, rtol=0)
    assert all(len(block._forward_pre_hooks) == 0 for block in decoder_layers(model))


def test_means_do_not_depend_on_batch_size(tiny_qwen):
    model, tok = _load(tiny_qwen)
    one = capture(model, tok, PROMPTS, batch_size=1, progress=False)
    many = capture(model, tok, PROMPTS, batch_size=7, progress=False)
    torch.testing.assert_close(one.mean, many.mean, atol=1e-5, rtol=0)
    assert capture(model, tok, PROMPTS, keep=False, progress=False).per_prompt is None


def test_transformer_lens_backend_matches_hooks_and_leaves_model_as_it_was(tiny):
    model, tok = tiny
    prompts = data.harmful_train()[:6]
    before = capture(model, tok, prompts, batch_size=4, keep=True, progress=False)
    attn = model.config._attn_implementation
    block_type = type(decoder_layers(model)[0])
    tl = capture(model, tok, prompts, batch_size=4, backend="transformer-lens", progress=False)
    torch.testing.assert_close(tl.mean, before.mean, atol=1e-5, rtol=0)
    assert type(decoder_layers(model)[0]) is block_type and model.config._attn_implementation == attn
    after = capture(model, tok, prompts, batch_size=4, keep=True, progress=False)
    assert torch.equal(after.per_prompt, before.per_prompt)


def test_capture_through_peft_adapter_sees_the_adapter(tiny_llama):
    from peft import LoraConfig, get_peft_model

    base, tok = _load(tiny_llama)
    plain = capture(base, tok, PROMPTS, progress=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.eval()
    with_adapter = capture(peft_model, tok, PROMPTS, progress=False)
    merged = capture(peft_model.merge_and_unload(), tok, PROMPTS, progress=False)
    torch.testing.assert_close(with_adapter.mean, merged.mean, atol=1e-5, rtol=0)
    # the adapter changed what enters every block after block 0
    assert (with_adapter.mean[1:] - plain.mean[1:]).abs().max() > 1e-3


def test_non_finite_activation_names_layer_and_prompt(tiny_llama):
    model, tok = _load(tiny_llama)
    ids, _ = tokenize_prompts(tok, PROMPTS)
    counts = [sum(tid in seq for seq in ids) for tid in range(len(tok))]
    target = 3  # a token that occurs in prompt 3 only
    unique = next(t for t in ids[target] if counts[t] == 1)
    with torch.no_grad():
        model.get_input_embeddings().weight[unique] = float("nan")
    # NaN at the token itself reaches the last positions through attention in block 0, so layer 1 is the first seen
    with pytest.raises(UserError, match=rf"layer 1 for prompt {target}\b.*float32"):
        capture(model, tok, PROMPTS, batch_size=2, progress=False)
    assert all(len(block._forward_pre_hooks) == 0 for block in decoder_layers(model))


def test_bad_inputs_are_user_errors(tiny_llama, monkeypatch):
    model, tok = _load(tiny_llama)
    with pytest.raises(UserError, match="no prompts"):
        capture(model, tok, [], progress=False)
    with pytest.raises(UserError, match="backend"):
        capture(model, tok, PROMPTS, backend="nnsight", progress=False)
    monkeypatch.setitem(sys.modules, "transformer_lens.model_bridge", None)
    with pytest.raises(UserError, match=r"pip install refusal-probe\[tl\]"):
        capture(model, tok, PROMPTS, backend="transformer-lens", progress=False)
