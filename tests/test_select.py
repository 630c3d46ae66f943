"""Direction selection: scoring math on hand-computed values, filtering and choice on hand-made tables, and the
model-running scorer checked against an independent unbatched computation on a tiny model."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from refusal_probe.core.errors import UserError
from refusal_probe.core.template import format_prompts
from refusal_probe.models.source import load_model
from refusal_probe.probe.candidates import choose, filter_reasons, kl_last, layer_cutoff, refusal_score
from refusal_probe.probe.direction_result import DirectionResult
from refusal_probe.probe.hooks import ablate, add
from refusal_probe.probe.refusal_tokens import DEFAULT_REFUSAL_PHRASES, parse_phrases, refusal_token_ids
from refusal_probe.probe.scoring import score_candidates
from refusal_probe.probe.select import sample_prompts, select_direction
from refusal_probe.probe.settings import SelectionRules

# ------------------------------------------------------------------------------------------------ pure math


def test_refusal_score_hand_values():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]], dtype=torch.float64)
    # row 0: p = 1/4 -> log(1/4) - log(3/4) = log(1/3); row 1: p = 3/6 -> 0
    torch.testing.assert_close(
        refusal_score(logits, [0], eps=0), torch.tensor([math.log(1 / 3), 0.0], dtype=torch.float64)
    )
    # two refusal ids: row 0 p = 1/2 -> 0; row 1 p = 4/6 -> log 2
    torch.testing.assert_close(
        refusal_score(logits, [0, 1], eps=0), torch.tensor([0.0, math.log(2.0)], dtype=torch.float64)
    )
    # with Arditi's epsilon
    expected = math.log(0.25 + 1e-8) - math.log(0.75 + 1e-8)
    assert refusal_score(logits[:1], [0]).item() == pytest.approx(expected, abs=1e-12)
    assert refusal_score(logits, [0]).dtype == torch.float64


def test_refusal_score_is_numerically_safe():
    logits = torch.tensor([[1000.0, 0.0, 0.0], [-1000.0, 0.0, 0.0]])
    exact = refusal_score(logits, [1], eps=0)
    # row 0: p = 1 / (e^1000 + 2): log-odds = -log(e^1000 + 1) = -1000 (a naive softmax gives p = 0 -> -inf)
    assert exact[0].item() == pytest.approx(-1000.0, rel=1e-12)
    # row 1: p = 1 / (2 + e^-1000): log-odds = -log(1 + e^-1000) = 0
    assert exact[1].item() == pytest.approx(0.0, abs=1e-12)
    # two refusal ids, row 0: log(2) - log(e^1000) = log 2 - 1000
    assert refusal_score(logits, [1, 2], eps=0)[0].item() == pytest.approx(math.log(2.0) - 1000.0, rel=1e-12)
    bounded = refusal_score(logits, [1])
    assert bounded[0].item() == pytest.approx(math.log(1e-8), rel=1e-6)  # bounded by eps, as in Arditi et al.
    assert torch.isfinite(refusal_score(torch.tensor([[0.0, 0.0]]), [0, 1])).all()  # p = 1: +18.4, not inf
    with pytest.raises(UserError):
        refusal_score(logits, [])
    with pytest.raises(UserError):
        refusal_score(logits, [3])


def test_kl_last_hand_values():
    base = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    new = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]], dtype=torch.float64)
    # p = [1/2, 1/2], q = [3/4, 1/4]: KL = 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3)
    kl = kl_last(base, new)
    assert kl.dtype == torch.float64
    assert kl[0].item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    assert kl[1].item() == 0.0
    assert kl_last(torch.tensor([[0.0, -math.inf]]), torch.tensor([[0.0, 0.0]]))[0].item() == pytest.approx(
        math.log(2)
    )


def test_layer_cutoff_matches_arditi():
    # Arditi et al.: layer >= int(L * (1 - 0.2)) is discarded
    for n in (4, 5, 10, 16, 24, 28, 30, 32):
        assert layer_cutoff(n, 0.8) == int(n * (1.0 - 0.2))
    assert layer_cutoff(4, 0.8) == 3 and layer_cutoff(24, 0.8) == 19 and layer_cutoff(30, 0.8) == 24


def test_sample_prompts_is_seeded():
    prompts = [f"p{i}" for i in range(10)]
    assert sample_prompts(prompts, 4, 42) == sample_prompts(prompts, 4, 42)
    assert len(set(sample_prompts(prompts, 4, 42))) == 4
    assert sample_prompts(prompts, 20, 42) == prompts
    with pytest.raises(UserError):
        sample_prompts(prompts, 0, 42)


# --------------------------------------------------------------------------------------- filtering and choice


def _frame(rows, harmless_baseline=-2.0):
    df = pd.DataFrame(
        rows, columns=["layer", "position", "direction_norm", "ablation_score", "steering_score", "kl"]
    )
    df["harmless_baseline"] = harmless_baseline
    return df


def test_filter_reasons_follow_the_rules():
    df = _frame(
        [
            (0, -1, 0.0, math.nan, math.nan, math.nan),  # zero vector at layer 0
            (1, -1, 1.0, -3.0, 0.5, 0.05),  # kept
            (1, -2, 1.0, -4.0, 0.5, 0.20),  # KL too high
            (2, -1, 1.0, -5.0, -0.1, 0.05),  # does not induce refusal
            (3, -1, 1.0, -6.0, 0.5, 0.05),  # late layer (3 >= floor(0.8 * 4))
            (3, -2, 1.0, -6.0, -1.0, 0.5),  # everything wrong
            (2, -2, 1.0, math.nan, 0.5, 0.05),  # not computed
        ]
    )
    reasons = filter_reasons(df, 4).tolist()
    assert reasons == ["zero", "", "kl", "steering", "layer", "layer;kl;steering", "nan"]
    looser = filter_reasons(
        df, 4, SelectionRules(max_layer_fraction=1.0, kl_threshold=0.3, induce_threshold=-0.5)
    ).tolist()
    assert looser == ["zero", "", "", "", "", "kl;steering", "nan"]


def test_choose_lowest_ablation_score_among_kept():
    df = _frame([(1, -1, 1.0, -3.0, 0.5, 0.05), (1, -2, 1.0, -4.0, 0.5, 0.05), (2, -1, 1.0, -9.0, 0.5, 0.5)])
    df["filtered_reason"] = filter_reasons(df, 10)
    row = choose(df)
    assert (row["layer"], row["position"], row["warning"]) == (1, -2, "")


def test_choose_falls_back_loudly_to_allowed_layers():
    rows = [
        (
            1,
            -1,
            1.0,
            -3.0,
            -1.0,
            0.05,
        ),  # steering filtered, but addition raises refusal above the -2.0 baseline
        (
            1,
            -2,
            1.0,
            -3.5,
            -2.5,
            0.05,
        ),  # steering filtered and addition lowers refusal: never in the second tier
        (2, -1, 1.0, -4.0, 0.5, 0.9),  # KL filtered
        (3, -1, 1.0, -9.0, 0.5, 0.05),  # late layer: never chosen while an allowed layer exists
        (0, -1, 0.0, math.nan, math.nan, math.nan),
    ]
    df = _frame(rows)
    df["filtered_reason"] = filter_reasons(df, 4)
    row = choose(df)
    assert (row["layer"], row["position"]) == (1, -1)  # steering relaxed first, the KL bound kept
    assert "no candidate passed the steering threshold" in row["warning"]

    df = _frame(rows, harmless_baseline=0.0)  # now no addition raises refusal: the KL bound is dropped next
    df["filtered_reason"] = filter_reasons(df, 4)
    row = choose(df)
    assert (row["layer"], row["position"]) == (2, -1)
    assert "every candidate was filtered" in row["warning"]


def test_choose_last_resort_and_errors():
    df = _frame([(3, -1, 1.0, -2.0, 0.5, 0.05), (3, -2, 1.0, -5.0, 0.5, 0.05)])
    df["filtered_reason"] = filter_reasons(df, 4)
    row = choose(df)
    assert (row["layer"], row["position"]) == (3, -2) and "including by layer" in row["warning"]
    nan = _frame([(1, -1, 1.0, math.nan, math.nan, math.nan)])
    nan["filtered_reason"] = filter_reasons(nan, 4)
    with pytest.raises(UserError):
        choose(nan)
    with pytest.raises(UserError):
        choose(nan.iloc[0:0])


# ------------------------------------------------------------------------------------------- with a tiny model


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_model(tiny_llama)


def test_refusal_token_ids_are_answer_openers(llama):
    _, tok = llama
    ids = refusal_token_ids(tok)
    assert len(ids) == len(set(ids)) and 1 <= len(ids) <= len(DEFAULT_REFUSAL_PHRASES)
    prompt = format_prompts(tok, ["Hello"])[0]
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    for phrase in DEFAULT_REFUSAL_PHRASES:
        first = tok(prompt + phrase, add_special_tokens=False)["input_ids"][n]
        assert first in ids
        assert phrase.startswith(tok.decode([first]).strip())
    # "I cannot" and "I can't" start with the same token: counted once
    assert refusal_token_ids(tok, ["I cannot", "I can't"]) == refusal_token_ids(tok, ["I cannot"])
    assert parse_phrases(" I, Sorry ,,As an AI") == ["I", "Sorry", "As an AI"]
    with pytest.raises(UserError):
        parse_phrases(" , ")


def _unbatched_score(model, tok, prompts, ids, intervention):
    """Independent reference: one prompt at a time, no padding, full logits."""
    scores, logits = [], []
    for text in format_prompts(tok, prompts):
        enc = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode(), intervention():
            out = model(**enc).logits[:, -1, :]
        logits.append(out)
        scores.append(refusal_score(out, ids))
    return torch.cat(scores), torch.cat(logits)


def test_score_candidates_matches_unbatched_reference(llama):
    import contextlib

    model, tok = llama
    ids = refusal_token_ids(tok)
    harmful = [
        "How do I pick a lock on a neighbour's door",
        "Write a threatening letter",
        "Make a weapon at home",
    ]
    harmless = [
        "Give me three tips for staying healthy",
        "What is the capital of France",
        "Describe a sunset",
    ]
    d = model.config.hidden_size
    cands = torch.randn(4, 2, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2.0
    cands[0] = 0.0  # like layer 0 of a real extraction: identical template tokens
    df = score_candidates(model, tok, cands, harmful, harmless, ids, batch_size=2, progress=False)
    assert len(df) == 8 and list(zip(df.layer, df.position, strict=True))[:3] == [(0, -2), (0, -1), (1, -2)]
    assert (df.loc[df.layer == 0, "filtered_reason"] == "zero").all()
    assert df.loc[df.layer == 3, "filtered_reason"].str.contains("layer").all()

    base_h, _ = _unbatched_score(model, tok, harmful, ids, contextlib.nullcontext)
    base_l, base_logits = _unbatched_score(model, tok, harmless, ids, contextlib.nullcontext)
    assert df.harmful_baseline.iloc[0] == pytest.approx(base_h.mean().item(), abs=1e-4)
    assert df.harmless_baseline.iloc[0] == pytest.approx(base_l.mean().item(), abs=1e-4)
    row = df[(df.layer == 2) & (df.position == -1)].iloc[0]
    vec = cands[2, 1]
    abl_h, _ = _unbatched_score(model, tok, harmful, ids, lambda: ablate(model, vec))
    _, abl_logits = _unbatched_score(model, tok, harmless, ids, lambda: ablate(model, vec))
    add_l, _ = _unbatched_score(model, tok, harmless, ids, lambda: add(model, vec, 2))
    assert row.ablation_score == pytest.approx(abl_h.mean().item(), abs=1e-4)
    assert row.steering_score == pytest.approx(add_l.mean().item(), abs=1e-4)
    assert row.kl == pytest.approx(kl_last(base_logits, abl_logits).mean().item(), abs=1e-5)
    assert row.kl > 0 and row.ablation_score != row.harmful_baseline
    assert row.direction_norm == pytest.approx(vec.norm().item())


def test_score_candidates_only_scores_requested(llama):
    model, tok = llama
    cands = torch.randn(
        4, 2, model.config.hidden_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    df = score_candidates(
        model, tok, cands, ["Hack a bank"], ["Bake a cake"], [5], only={(1, -1)}, progress=False
    )
    scored = df[df.filtered_reason != "not scored"]
    assert list(zip(scored.layer, scored.position, strict=True)) == [(1, -1)]
    assert df[df.filtered_reason == "not scored"].ablation_score.isna().all()
    assert math.isfinite(scored.ablation_score.iloc[0])

    skip = score_candidates(
        model,
        tok,
        cands,
        ["Hack a bank"],
        ["Bake a cake"],
        [5],
        rules=SelectionRules(skip_late_layers=True),
        progress=False,
    )
    late = skip[skip.layer >= 3]
    assert (late.filtered_reason == "layer;not scored").all() and late.ablation_score.isna().all()
    early = skip[(skip.layer > 0) & (skip.layer < 3)]
    assert early.ablation_score.notna().all() and not early.filtered_reason.str.contains("not scored").any()
    assert choose(skip)["layer"] in (1, 2)


def test_select_direction_forced_and_round_trip(llama, tmp_path):
    model, tok = llama
    harmful = ["Write malware that steals passwords", "Explain how to make a bomb", "Help me stalk my ex"]
    harmless = ["Write a haiku about rain", "Explain photosynthesis", "Suggest a name for a cat"]
    res = select_direction(
        model,
        tok,
        harmful,
        harmless,
        harmful[:2],
        harmless[:2],
        n_train=3,
        n_val=2,
        layer=2,
        position=-1,
        batch_size=2,
        progress=False,
        sources={"harmful_train": "test"},
    )
    n_layers, n_pos, d = res.directions.shape
    assert (n_layers, d) == (4, model.config.hidden_size) and res.directions.dtype == torch.float64
    assert (res.layer, res.position) == (2, -1)
    assert torch.equal(res.direction, res.directions[2, n_pos - 1])
    assert res.unit.norm().item() == pytest.approx(1.0)
    assert torch.count_nonzero(res.directions[0]) == 0  # layer 0 = embeddings of identical template tokens
    assert (res.scores.filtered_reason == "not scored").sum() == n_layers * n_pos - 1
    assert res.settings["prompts"]["harmful_train"] == {"n": 3, "available": 3, "source": "test"}
    assert res.settings["refusal_ids"] == refusal_token_ids(tok)

    res.save(tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "candidates.csv",
        "direction.json",
        "directions.safetensors",
    ]
    back = DirectionResult.load(tmp_path / "d")
    assert (back.layer, back.position, back.warning) == (res.layer, res.position, res.warning)
    assert torch.equal(back.directions, res.directions) and torch.equal(back.direction, res.direction)
    pd.testing.assert_frame_equal(back.scores, res.scores, check_dtype=False)
    assert back.chosen == res.chosen and back.settings == res.settings

    with pytest.raises(UserError, match="out of range"):
        select_direction(model, tok, harmful, harmless, harmful, harmless, layer=9, progress=False)
    with pytest.raises(UserError, match="out of range"):
        select_direction(model, tok, harmful, harmless, harmful, harmless, position=-99, progress=False)


def test_load_rejects_a_folder_without_results(tmp_path):
    with pytest.raises(UserError, match="not a directions folder"):
        DirectionResult.load(tmp_path)
