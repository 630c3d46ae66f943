"""Batched greedy generation on tiny random models: input order and left padding, early exit that leaves the batch
with verdicts identical to full-length generation, and out-of-memory back-off with an injected failure."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from refusal_probe.core.errors import UserError
from refusal_probe.core.generate import format_chat, generate, generate_detailed, is_out_of_memory
from refusal_probe.data import advbench
from refusal_probe.evaluate.judge import KeywordJudge

PROMPTS = advbench()[:8]


def _load(path):
    from refusal_probe.models.source import load_model

    return load_model(path)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return _load(tiny_llama)


def _judge_with_keyword_in_some(texts: list[str]) -> KeywordJudge:
    """A judge whose keyword (a 3-character string) occurs in about half the texts, early in some of them."""
    df: Counter[str] = Counter()
    for t in texts:
        low = t.lower()
        df.update({low[i : i + 3] for i in range(len(low) - 2) if low[i : i + 3].strip() == low[i : i + 3]})
    target = len(texts) / 2
    best = min(sorted(df), key=lambda k: (abs(df[k] - target), k))
    assert 0 < df[best] < len(texts)
    return KeywordJudge("test", (best,), normalized=False, empty_is_refusal=False)


def test_results_in_input_order_match_one_by_one(llama):
    model, tok = llama
    batched = generate(model, tok, PROMPTS[:5], max_new_tokens=6, batch_size=3, progress=False)
    single = [
        generate(model, tok, [p], max_new_tokens=6, batch_size=1, progress=False)[0] for p in PROMPTS[:5]
    ]
    assert batched == single
    assert len(set(batched)) > 1  # different prompts, different answers: an order mix-up would show


def test_chat_template_applied(llama):
    _, tok = llama
    text = format_chat(tok, ["Hi there"])[0]
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_early_exit_verdicts_equal_full_length(llama):
    model, tok = llama
    full = generate_detailed(model, tok, PROMPTS, max_new_tokens=24, batch_size=4, progress=False)
    judge = _judge_with_keyword_in_some([g.text for g in full])
    shapes = []
    orig = model.forward

    def forward(*args, **kwargs):
        shapes.append((kwargs["input_ids"].shape, kwargs["attention_mask"].shape[1]))
        return orig(*args, **kwargs)

    model.forward = forward
    try:
        early = generate_detailed(
            model, tok, PROMPTS, max_new_tokens=24, batch_size=4, stop=judge.has_keyword, progress=False
        )
    finally:
        del model.forward
    # continuous batching: prompts were prefilled into rows freed by finished ones, while others kept decoding
    prefills = [i for i, (shape, _) in enumerate(shapes) if shape[1] > 1]
    assert len(prefills) >= 2 and prefills[1] < len(shapes) - 1
    assert all(shape[0] <= 4 for shape, _ in shapes)
    assert [judge.is_refusal(g.text) for g in early] == [judge.is_refusal(g.text) for g in full]
    finishes = Counter(g.finish for g in early)
    assert finishes["stop"] >= 1 and finishes["stop"] < len(PROMPTS)
    for e, f in zip(early, full, strict=True):
        if e.finish == "stop":
            assert e.n_tokens <= f.n_tokens and f.text.startswith(e.text.rstrip("\ufffd"))
        else:  # never stopped: exactly the full-length response
            assert (e.text, e.n_tokens) == (f.text, f.n_tokens)
    assert sum(g.n_tokens for g in early) < sum(g.n_tokens for g in full)


def test_early_exit_loop_equals_hf_generate_on_qwen(tiny_qwen):
    model, tok = _load(tiny_qwen)
    full = generate(model, tok, PROMPTS[:6], max_new_tokens=12, batch_size=6, progress=False)
    loop = generate(
        model, tok, PROMPTS[:6], max_new_tokens=12, batch_size=6, stop=lambda t: False, progress=False
    )
    assert loop == full


class _OOMAbove:
    """Wraps a model's forward so that batches larger than ``limit`` fail like a full GPU."""

    def __init__(self, model, limit: int, error: type[BaseException] = torch.OutOfMemoryError):
        self.model, self.limit, self.error, self.raised = model, limit, error, 0
        self.orig = model.forward

    def __enter__(self):
        def forward(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and ids.shape[0] > self.limit:
                self.raised += 1
                raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.orig(*args, **kwargs)

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward  # back to the class's forward


@pytest.mark.parametrize("early", [False, True])
def test_out_of_memory_splits_the_batch(llama, early):
    model, tok = llama
    stop = (lambda t: "zz" in t) if early else None
    want = generate(model, tok, PROMPTS[:6], max_new_tokens=5, batch_size=6, stop=stop, progress=False)
    with _OOMAbove(model, limit=2) as oom:
        got = generate(model, tok, PROMPTS[:6], max_new_tokens=5, batch_size=6, stop=stop, progress=False)
    assert oom.raised >= 2  # 6 -> 3 -> 2, then the smaller size is kept
    assert got == want


def test_runtime_error_out_of_memory_and_single_prompt(llama):
    model, tok = llama
    with _OOMAbove(model, limit=1, error=RuntimeError) as oom:
        out = generate(model, tok, PROMPTS[:3], max_new_tokens=3, batch_size=3, progress=False)
    assert len(out) == 3 and oom.raised >= 1
    with (
        _OOMAbove(model, limit=0),
        pytest.raises(UserError, match="out of memory generating a single prompt"),
    ):
        generate(model, tok, PROMPTS[:2], max_new_tokens=3, batch_size=2, progress=False)
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_early_exit_past_the_cache_headroom_equals_hf_generate(tiny_qwen):
    """Longer than one buffer of the growing cache layers (re-buffered mid-answer), with rows of unequal prompt
    lengths (left padding) leaving and refilled: the tokens of every row that never stopped are HF generate's."""
    from refusal_probe.core.generate import HEADROOM

    model, tok = _load(tiny_qwen)
    n = HEADROOM + 10
    prompts = [*PROMPTS, "Hi", "Tell me a story about a cat"]
    full = generate_detailed(model, tok, prompts, max_new_tokens=n, batch_size=3, progress=False)
    loop = generate_detailed(
        model, tok, prompts, max_new_tokens=n, batch_size=3, stop=lambda t: False, progress=False
    )
    assert loop == full
    judge = _judge_with_keyword_in_some([g.text for g in full])
    early = generate_detailed(
        model, tok, prompts, max_new_tokens=n, batch_size=3, stop=judge.has_keyword, progress=False
    )
    stopped = [e.finish == "stop" for e in early]
    assert any(stopped) and not all(stopped)
    for e, f in zip(early, full, strict=True):
        if e.finish != "stop":
            assert e == f and e.n_tokens > HEADROOM


def test_refill_when_every_row_in_flight_is_a_long_answer(llama):
    """A free row is refilled at once when all rows in flight are past SETTLED tokens (long answers that will
    hold their rows), but waits for a quarter of the batch while a young row may still stop soon."""
    from refusal_probe.core.generate import SETTLED, _EarlyExit

    model, tok = llama

    class _Bar:
        def update(self, n):
            pass

    run = _EarlyExit(model, tok, [[1]] * 12, list(range(12)), 8, 0, {2}, lambda t: False, 8, _Bar())
    run.pending.clear()
    run.pending.extend([8, 9])
    run.rows = list(range(7))  # one row free, a quarter of 8 would be two
    run.tokens = {i: [5] * SETTLED for i in run.rows}
    assert run._should_admit(1)
    run.tokens[3] = [5] * (SETTLED - 1)
    assert not run._should_admit(1)
    run.rows = run.rows[:6]
    assert run._should_admit(2)
    run.pending.clear()
    assert not run._should_admit(2)
