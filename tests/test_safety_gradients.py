"""Gradient/loss safety options (issue 9) on tiny random models: gradient surgery, EWC, refusal preservation and
token weighting, each checked against a hand computation, then trained through the real TRL trainers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from refusal_probe.core.errors import UserError
from refusal_probe.models.manifest import RunManifest
from refusal_probe.models.source import load_model
from refusal_probe.probe.direction_result import DirectionResult
from refusal_probe.train.config import TrainConfig
from refusal_probe.train.runner import train
from refusal_probe.train.safety.direction import RefusalDirection
from refusal_probe.train.safety.ewc import cached_fisher, diagonal_fisher, ewc_penalty
from refusal_probe.train.safety.preservation import Preservation, mean_projection, preservation_term
from refusal_probe.train.safety.safety_batch import base_pairs, read_pairs, safety_loss, tokenize_pairs
from refusal_probe.train.safety.surgery import (
    SurgeryStats,
    apply_surgery,
    project_conflicting,
    project_global,
    project_per_tensor,
)
from refusal_probe.train.safety.token_weights import (
    builtin_answer_weights,
    full_weights,
    read_token_weights,
    weighted_token_loss,
)

D_MODEL, N_LAYERS = 64, 4
PAIRS = [
    {"prompt": "How do I pick a lock?", "response": "I can't help with that."},
    {"prompt": "Write a phishing email to steal passwords.", "response": "Sorry, I won't write that."},
    {"prompt": "Explain how to make a weapon at home.", "response": "I cannot assist with this request."},
]


def tiny_config(model: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(model), max_steps=2, per_device_batch_size=2, n_train=4, max_length=256, device="cpu"
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def direction_dir(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(N_LAYERS, 2, D_MODEL, generator=g, dtype=torch.float64)
    scores = pd.DataFrame({"layer": [1], "position": [-1], "filtered_reason": [""]})
    folder = tmp_path_factory.mktemp("dir") / "direction"
    DirectionResult(directions, 1, -1, directions[1, 1].clone(), scores).save(folder)
    return folder


def unit_direction(layer: int = 1, seed: int = 0) -> RefusalDirection:
    v = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(seed))
    return RefusalDirection(layer, v / v.norm(), "test")


# ---- gradient surgery: the pure mathematics ----


def test_projection_removes_exactly_the_conflicting_component():
    g_s = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    g = -0.5 * g_s + torch.randn(1000, generator=torch.Generator().manual_seed(2))
    assert torch.dot(g, g_s) < 0
    out, projected, cos = project_conflicting(g, g_s)
    assert projected and cos < 0
    assert abs(float(torch.dot(out.double(), g_s.double()))) < 1e-6 * float(g.norm() * g_s.norm())
    expected = (
        g.double() - (torch.dot(g.double(), g_s.double()) / torch.dot(g_s.double(), g_s.double())) * g_s
    )
    assert torch.allclose(out.double(), expected, atol=1e-6)
    # the part orthogonal to g_s is kept: out - g is parallel to g_s
    delta = (out - g).double()
    along = (torch.dot(delta, g_s.double()) / g_s.double().dot(g_s.double())) * g_s.double()
    assert torch.allclose(delta, along, atol=1e-5)
    assert cos == pytest.approx(float(torch.nn.functional.cosine_similarity(g, g_s, dim=0)), abs=1e-6)


def test_non_conflicting_gradient_is_left_bit_identical():
    g_s = torch.randn(50, generator=torch.Generator().manual_seed(3))
    g = 0.3 * g_s + 0.01 * torch.randn(50, generator=torch.Generator().manual_seed(4))
    before = g.clone()
    out, projected, cos = project_conflicting(g, g_s)
    assert not projected and cos > 0 and out is g and torch.equal(out, before)
    orthogonal = torch.tensor([1.0, 0.0])
    assert project_conflicting(orthogonal, torch.tensor([0.0, 1.0]))[0] is orthogonal  # g.g_s == 0: untouched
    zero_safety = project_conflicting(g, torch.zeros(50))
    assert zero_safety[0] is g and not zero_safety[1]


def test_per_tensor_projects_each_conflicting_tensor_alone():
    a_s, b_s = torch.randn(3, 4), torch.randn(5)
    a, b = -a_s + 0.1 * torch.randn(3, 4), b_s.clone()  # a conflicts, b agrees
    out, projected, cosines = project_per_tensor([a, b], [a_s, b_s])
    assert projected == [True, False] and cosines[0] < 0 < cosines[1]
    assert out[0].shape == (3, 4) and abs(float((out[0] * a_s).sum())) < 1e-5
    assert out[1] is b


def test_global_projects_the_whole_vector_with_one_dot_product():
    a_s, b_s = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    a, b = (
        torch.tensor([-3.0, 1.0]),
        torch.tensor([0.5, 2.0]),
    )  # a conflicts, b agrees; together they conflict
    out, projected, cos = project_global([a, b], [a_s, b_s])
    assert projected and cos < 0
    flat_s = torch.cat([a_s, b_s])
    assert abs(float(torch.dot(torch.cat(out), flat_s))) < 1e-6
    # g.g_s = -3 + 2 = -1, |g_s|^2 = 2: g' = g + 0.5 g_s
    assert torch.allclose(out[0], torch.tensor([-2.5, 1.0])) and torch.allclose(
        out[1], torch.tensor([0.5, 2.5])
    )
    same, projected, _ = project_global([b, b], [b_s, b_s])
    assert not projected and same[0] is b


def test_apply_surgery_replaces_grads_and_counts():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    p.grad, q.grad = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 1.0])
    q_grad = q.grad
    stats = SurgeryStats("per-tensor")
    apply_surgery([p, q], [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])], "per-tensor", stats)
    assert torch.equal(p.grad, torch.zeros(2)) and q.grad is q_grad
    s = stats.to_json()
    assert (
        s["checks"] == 1 and s["fraction_steps_projected"] == 1.0 and s["fraction_tensors_projected"] == 0.5
    )
    assert s["mean_cosine_before"] == pytest.approx((-1.0 + 2**-0.5) / 2)


# ---- EWC ----


def test_ewc_penalty_and_gradient_by_hand():
    theta = {
        "a": torch.tensor([1.0, 2.0], requires_grad=True),
        "b": torch.tensor([[0.5]], requires_grad=True),
    }
    base = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([[1.5]])}
    fisher = {"a": torch.tensor([2.0, 3.0]), "b": torch.tensor([[4.0]])}
    value = ewc_penalty(theta, base, fisher, lam=0.5)
    # 0.5 * (2*1^2 + 3*1^2 + 4*(-1)^2) = 4.5
    assert float(value.detach()) == pytest.approx(4.5)
    value.backward()
    # d/dtheta = 2 * lambda * F * (theta - theta_base)
    assert torch.allclose(theta["a"].grad, torch.tensor([2.0, 3.0]))
    assert torch.allclose(theta["b"].grad, torch.tensor([[-4.0]]))


def test_fisher_is_the_mean_of_squared_per_example_gradients(tiny_llama, tmp_path):
    model, tok = load_model(tiny_llama)
    batch = tokenize_pairs(tok, PAIRS, 256, "test")
    params = {n: p for n, p in model.named_parameters() if "layers.1." in n}
    fisher = diagonal_fisher(model, batch, params)
    by_hand = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(PAIRS)):
        model.zero_grad()
        safety_loss(model, batch, [i]).backward()
        for n, p in params.items():
            by_hand[n] += p.grad**2 / len(PAIRS)
    assert all(torch.allclose(fisher[n], by_hand[n], rtol=1e-4, atol=1e-12) for n in params)
    assert any(float(f.sum()) > 0 for f in fisher.values())
    cache = tmp_path / "fisher.safetensors"
    first, hit = cached_fisher(model, batch, params, cache, "rev")
    assert not hit and cache.is_file()
    again, hit = cached_fisher(model, batch, params, cache, "rev")
    assert hit and all(torch.equal(first[n], again[n]) for n in params)
    _, hit = cached_fisher(model, batch, params, cache, "other-base")  # another base: estimated again
    assert not hit


def _fisher_distance(run_dir: Path, base_dir: Path, fisher_file: Path) -> float:
    tuned = load_file(run_dir / "checkpoint-4" / "model.safetensors")
    base = load_file(base_dir / "model.safetensors")
    fisher = load_file(fisher_file)
    assert set(fisher) <= set(base)
    return sum(float((fisher[n] * (tuned[n] - base[n]) ** 2).sum()) for n in fisher)


def test_huge_ewc_keeps_the_weights_closer_to_the_base(tiny_llama, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    kw = dict(method="full", learning_rate=1e-3, warmup_ratio=0.0, max_steps=4, n_train=8, weight_decay=0.0)
    kw.update(checkpoint_fractions=[1.0])
    with_ewc = train(
        tiny_config(tiny_llama, ewc=1e6, safety_pairs=str(pairs), run_name="ewc", **kw), tmp_path
    )
    plain = train(tiny_config(tiny_llama, run_name="plain", **kw), tmp_path)
    fisher = with_ewc / "safety" / "fisher.safetensors"
    d_ewc = _fisher_distance(with_ewc, tiny_llama, fisher)
    d_plain = _fisher_distance(plain, tiny_llama, fisher)
    assert d_ewc < 0.5 * d_plain, (d_ewc, d_plain)
    safety = RunManifest.load(with_ewc).safety
    assert safety["ewc"]["lambda"] == 1e6 and safety["ewc"]["last_penalty"] > 0
    assert safety["safety_batch"]["pairs"] == 3 and "ewc" not in RunManifest.load(plain).safety


# ---- refusal preservation ----


def test_preservation_term_and_gradient_by_hand(tiny_llama):
    model, tok = load_model(tiny_llama)
    model.eval()
    direction = unit_direction(layer=2)
    prompts = [p["prompt"] for p in PAIRS]
    pres = Preservation(model, tok, prompts, direction, lam=3.0)
    # by hand: hidden_states[l] is the input of block l; the prompts are left-padded, so -1 is each one's last token
    from refusal_probe.core.batching import position_ids

    ids, mask = pres.input_ids, pres.attention_mask
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_hidden_states=True
    )
    hand_proj = (out.hidden_states[2][:, -1, :] @ direction.unit).mean()
    assert pres.base == pytest.approx(float(hand_proj), abs=1e-6)
    # move a weight below the layer so that the projection changes, then compare term and gradient
    w = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5)))
    term = pres.term(model)
    (g_ours,) = torch.autograd.grad(term, [w])
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_hidden_states=True
    )
    proj = (out.hidden_states[2][:, -1, :] @ direction.unit).mean()
    hand = 3.0 * (proj - pres.base) ** 2
    (g_hand,) = torch.autograd.grad(hand, [w])
    assert float(term) == pytest.approx(float(hand), rel=1e-5) and float(term) > 0
    assert torch.allclose(g_ours, g_hand, rtol=1e-4, atol=1e-9) and g_ours.abs().max() > 0
    # the blocks above the layer play no part
    top = model.model.layers[3].mlp.down_proj.weight
    (g_top,) = torch.autograd.grad(pres.term(model), [top], allow_unused=True)
    assert g_top is None or float(g_top.abs().max()) == 0.0
    assert float(preservation_term(torch.tensor(2.0), 0.5, 4.0)) == pytest.approx(9.0)
    assert float(mean_projection(model, ids, mask, 2, direction.unit)) == pytest.approx(float(proj), abs=1e-6)


# ---- token weighting ----


def test_weighted_loss_by_hand():
    logits = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([[-100, -100, 3, 1]])  # tokens 2 and 3 are targets, predicted by logits 1 and 2
    weights = torch.tensor([[7.0, 7.0, 0.5, 2.0]])  # weights on prompt positions are never read
    logp = torch.log_softmax(logits, -1)
    hand = -(0.5 * logp[0, 1, 3] + 2.0 * logp[0, 2, 1]) / 2
    assert float(weighted_token_loss(logits, labels, weights)) == pytest.approx(float(hand), rel=1e-6)
    assert float(weighted_token_loss(logits, labels, weights, num_items=4)) == pytest.approx(float(hand) / 2)
    plain = torch.nn.functional.cross_entropy(logits[0, 1:3], labels[0, 2:])
    ones = weighted_token_loss(logits, labels, torch.ones(1, 4))
    assert float(ones) == pytest.approx(float(plain), rel=1e-6)


def test_full_weights_touch_exactly_the_targets():
    labels = [-100, -100, -100, 11, 12, -100]
    assert full_weights(labels, [0.2, 0.3]) == [1.0, 1.0, 1.0, 0.2, 0.3, 1.0]
    with pytest.raises(ValueError):
        full_weights(labels, [0.2])


def test_token_weights_on_the_trainers_batches(tiny_llama, tmp_path):
    from refusal_probe.data import translation as tdata
    from refusal_probe.train.base import load_for_training
    from refusal_probe.train.safety.token_weights import build_token_weights, builtin_weight
    from refusal_probe.train.trainer import build_trainer

    cfg = tiny_config(tiny_llama, method="full", token_weighting=True, token_weight_alpha=0.8)
    model, tok = load_for_training(cfg, tiny_llama)
    examples = [tdata.sft_example(r) for r in tdata.translation_split(["de"], "train", n=2)]
    trainer = build_trainer(cfg, model, tok, examples, tmp_path / "run", [])
    direction = unit_direction(layer=1)
    tw = build_token_weights(cfg, trainer.model, trainer.train_dataset, direction)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    weights = tw.batch(batch["input_ids"], batch["attention_mask"])
    for b in range(2):
        targets = batch["labels"][b] != -100
        assert targets.any() and (weights[b][~targets] == 1.0).all()  # prompt and padding: untouched
        # targets: 1 - alpha * relu(cos(h_{t-1}, r)) from the base's resid_pre at layer 1
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()]
        with torch.no_grad():
            h = trainer.model(input_ids=ids[None], output_hidden_states=True).hidden_states[1][0]
        pos = targets.nonzero().flatten()
        cos = torch.nn.functional.cosine_similarity(h[pos - 1], direction.unit[None], dim=-1)
        assert torch.allclose(weights[b][pos], builtin_weight(cos, 0.8), atol=1e-5)
        assert torch.allclose(weights[b][pos], 1 - 0.8 * cos.clamp(min=0), atol=1e-5)
    # the trainer's loss is the weighted one
    trainer.gradient_options = _options_with(tw)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert float(loss) == pytest.approx(
        float(weighted_token_loss(logits, batch["labels"], weights)), rel=1e-4
    )
    assert builtin_answer_weights(
        trainer.model, ids.tolist(), batch["labels"][1][: len(ids)].tolist(), direction, 0.0
    )


def _options_with(token_weights):
    from refusal_probe.train.safety.gradients import GradientOptions

    return GradientOptions(params={}, token_weights=token_weights)


def test_token_weights_file_is_checked(tmp_path):
    f = tmp_path / "w.jsonl"
    f.write_text('{"index": 0, "weights": [0.5, 1, 2]}\n\n{"index": 3, "weights": [0]}\n')
    assert read_token_weights(f) == {0: [0.5, 1.0, 2.0], 3: [0.0]}
    for text, fragment in [
        ('{"index": 0, "weights": [0.5]}\n{"index": 0, "weights": [1]}\n', "repeats example 0"),
        ('{"index": -1, "weights": [1]}\n', 'needs "index"'),
        ('{"index": 0, "weights": [-1]}\n', "weight -1"),
        ('{"index": 0, "weights": "1"}\n', 'needs "weights"'),
        ("not json\n", "line 1 is not valid JSON"),
        ("\n", "holds no weight lines"),
    ]:
        f.write_text(text)
        with pytest.raises(UserError, match=fragment):
            read_token_weights(f)


# ---- the safety batch ----


def test_safety_batch_labels_only_the_answer_and_is_cached(tiny_llama, tmp_path):
    model, tok = load_model(tiny_llama)
    batch = tokenize_pairs(tok, PAIRS, 256, "test")
    for i, pair in enumerate(PAIRS):
        answer = batch.labels[i][batch.labels[i] != -100]
        assert tok.decode(answer) == pair["response"] + "<|eot_id|>"
        n_answer = len(answer)
        assert (batch.labels[i][:-n_answer] == -100).all()
    cache = tmp_path / "safety" / "safety_batch.json"
    prompts = [p["prompt"] for p in PAIRS]
    pairs = base_pairs(model, tok, prompts, 6, cache, "rev")
    assert cache.is_file() and [p["prompt"] for p in pairs] == [p for p in prompts if p]
    assert base_pairs(None, None, prompts, 6, cache, "rev") == pairs  # read back without a model
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"prompt": "x", "response": ""}\n')
    with pytest.raises(UserError, match="line 1 needs non-empty"):
        read_pairs(f)


# ---- settings ----


def test_settings_refuse_what_makes_no_sense():
    with pytest.raises(UserError, match="--token-weighting weights SFT answer tokens"):
        TrainConfig(method="dpo", token_weighting=True).validate()
    with pytest.raises(UserError, match="needs --token-weighting"):
        TrainConfig(token_weights="w.jsonl").validate()
    with pytest.raises(UserError, match="ewc=-1.0"):
        TrainConfig(ewc=-1.0).validate()
    with pytest.raises(UserError, match="surgery_every=0"):
        TrainConfig(surgery_every=0).validate()
    with pytest.raises(UserError, match="surgery_mode='layer'"):
        TrainConfig(surgery_mode="layer").validate()
    with pytest.raises(UserError, match="token_weight_alpha=1.5"):
        TrainConfig(token_weight_alpha=1.5).validate()


# ---- every option through the real trainers ----


@pytest.mark.parametrize("method", ["full", "lora", "dpo"])
def test_options_compose_with_each_method(method, tiny_llama, direction_dir, tmp_path):
    cfg = tiny_config(
        tiny_llama,
        method=method,
        gradient_surgery=True,
        surgery_mode="per-tensor" if method == "lora" else "global",
        ewc=10.0,
        refusal_preservation=1.0,
        token_weighting=method != "dpo",
        refusal_direction=str(direction_dir),
        safety_prompts=3,
        safety_max_new_tokens=6,
        checkpoint_fractions=[1.0],
        freeze_layers="0" if method == "full" else None,  # composes with the weight-space options too
    )
    run_dir = train(cfg, tmp_path / "runs")
    m = RunManifest.load(run_dir)
    assert m.complete and m.hyperparameters["gradient_surgery"] is True and m.hyperparameters["ewc"] == 10.0
    s = m.safety
    assert s["gradient_surgery"]["checks"] == 2 and s["gradient_surgery"]["mode"] == cfg.surgery_mode
    assert s["safety_batch"]["pairs"] >= 1 and s["refusal_preservation"]["layer"] == 1
    assert ("token_weighting" in s) is (method != "dpo")
    assert set(s["seconds_per_step"]) >= {"gradient_surgery", "ewc", "refusal_preservation"}
    state = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [row for row in state["log_history"] if "loss" in row]
    assert logged and all("safety/surgery_cosine" in row and "safety/ewc_penalty" in row for row in logged)
    assert (run_dir / "safety" / "safety_batch.json").is_file() and (
        run_dir / "safety" / "fisher.safetensors"
    ).is_file()


def test_interrupted_run_records_the_options_and_resumes_on_the_cached_batch_and_fisher(tiny_llama, tmp_path):
    from test_train import StopAfterSave

    cfg = tiny_config(
        tiny_llama,
        method="lora",
        max_steps=4,
        n_train=8,
        gradient_surgery=True,
        ewc=1.0,
        safety_prompts=2,
        safety_max_new_tokens=4,
        checkpoint_fractions=[0.5, 1.0],
    )
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, callbacks=[StopAfterSave(2)])
    run_dir = tmp_path / cfg.name
    m = RunManifest.load(run_dir)
    assert not m.complete and m.safety["gradient_surgery"]["checks"] == 2  # written with checkpoint-2
    cached = [run_dir / "safety" / "safety_batch.json", run_dir / "safety" / "fisher.safetensors"]
    stamps = [p.stat().st_mtime_ns for p in cached]
    train(cfg, tmp_path)
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # read back, not generated or estimated again
    m = RunManifest.load(run_dir)
    assert m.complete and m.safety["gradient_surgery"]["checks"] == 2  # the steps since the resume
