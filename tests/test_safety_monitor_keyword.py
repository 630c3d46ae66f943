"""The safety monitor's second signal (--monitor-keyword-prompts): keyword refusal of greedy answers, on tiny
random models whose lm_head is set so that some prompts are answered with an immediate end of turn (an empty
answer, which the evaluation's keyword judge counts as a refusal) and others are not."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from refusal_probe import data
from refusal_probe.core.generate import generate
from refusal_probe.evaluate.judge import get_judge
from refusal_probe.models.manifest import RunManifest
from refusal_probe.models.source import load_model
from refusal_probe.probe.activations import capture
from refusal_probe.probe.direction_result import DirectionResult
from refusal_probe.train.config import TrainConfig
from refusal_probe.train.runner import train
from refusal_probe.train.safety.keyword_signal import keyword_refusal

N_PROMPTS, N_TOKENS = 4, 4


def rig(src: Path, dst: Path, k: int) -> Path:
    """A copy of ``src`` whose end-of-turn logit is 50 x the final hidden state's k-th coordinate."""
    model, tok = load_model(src, device="cpu")
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0
        model.lm_head.weight[tok.eos_token_id, k] = 50.0
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def independent_rate(model_dir: Path, prompts: list[str]) -> float:
    """The judge's refusal rate on full-length greedy answers (HF generate, no early exit), one by one."""
    model, tok = load_model(model_dir, device="cpu")
    judge = get_judge("keywords")
    texts = [
        generate(model, tok, [p], max_new_tokens=N_TOKENS, batch_size=1, progress=False)[0] for p in prompts
    ]
    return sum(judge.is_refusal(t) for t in texts) / len(texts)


@pytest.fixture(scope="module")
def mixed(tiny_llama, tmp_path_factory) -> tuple[Path, float]:
    """A rigged model refusing some but not all of the monitor's prompts, and its independently measured rate."""
    prompts = data.harmful_val()[:N_PROMPTS]
    for k in range(16):
        path = rig(tiny_llama, tmp_path_factory.mktemp(f"rig{k}") / "model", k)
        rate = independent_rate(path, prompts)
        if 0 < rate < 1:
            return path, rate
    raise AssertionError("no coordinate gives a mixed refusal rate")


def test_keyword_signal_is_the_judges_refusal_rate(mixed):
    path, rate = mixed
    model, tok = load_model(path, device="cpu")
    model.train()
    value = keyword_refusal(model, tok, data.harmful_val()[:N_PROMPTS], get_judge("keywords"), N_TOKENS)
    assert value == rate and model.training  # train mode restored
    assert math.isnan(keyword_refusal(model, tok, [], get_judge("keywords"), N_TOKENS))


def tiny_config(model: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(model),
        method="full",
        max_steps=4,
        per_device_batch_size=2,
        n_train=8,
        max_length=256,
        device="cpu",
        learning_rate=1e-3,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        safety_monitor=True,
        monitor_prompts=N_PROMPTS,
        monitor_keyword_prompts=N_PROMPTS,
        monitor_max_new_tokens=N_TOKENS,
    )
    return TrainConfig(**{**base, **kw})


def negative_direction(model_dir: Path, folder: Path, layer: int = 1) -> Path:
    """Minus the base's mean harmful activation: the projection signal starts negative, so it never fails and
    every rollback is the keyword signal's."""
    model, tok = load_model(model_dir, device="cpu")
    acts = capture(model, tok, data.harmful_val()[:N_PROMPTS], progress=False)
    mean = -acts.mean[:, acts.index(-1)]
    scores = pd.DataFrame({"layer": [layer], "position": [-1], "filtered_reason": [""]})
    DirectionResult(mean[:, None, :].repeat(1, 2, 1), layer, -1, mean[layer].clone(), scores).save(folder)
    return folder


class Trajectory(TrainerCallback):
    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.steps.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("method", ["full", "lora", "dpo"])
def test_start_signal_in_run_json_is_the_independent_rate(method, mixed, tmp_path):
    path, rate = mixed
    d = negative_direction(path, tmp_path / "dir")
    cfg = tiny_config(path, method=method, max_steps=1, monitor_every=1, refusal_direction=str(d))
    mon = RunManifest.load(train(cfg, tmp_path / "runs")).safety["monitor"]
    assert mon["start_keyword"] == rate and mon["events"][0]["keyword"] == rate
    assert mon["keyword_prompts"] == N_PROMPTS and mon["keyword_max_new_tokens"] == N_TOKENS
    assert mon["keyword_judge"] == get_judge("keywords").signature
    assert 0 < mon["keyword_s"] <= mon["monitor_s"]
    assert len(mon["events"]) == 2 and 0 <= mon["events"][1]["keyword"] <= 1  # measured after the step too


def test_keyword_rollback_alone_restores_the_exact_weights_and_lowers_the_lr(mixed, tmp_path):
    path, rate = mixed
    d = negative_direction(path, tmp_path / "dir")
    cfg = tiny_config(
        path,
        monitor_every=2,
        monitor_tolerance=10.0,  # the keyword rate is never 10x its start: every check rolls back
        monitor_lr_factor=0.5,
        refusal_direction=str(d),
    )
    traj = Trajectory()
    run = train(cfg, tmp_path / "runs", callbacks=[traj])
    base = load_file(str(path / "model.safetensors"))
    for n, w in load_file(str(run / "checkpoint-2" / "model.safetensors")).items():
        if n in traj.steps[0]:
            assert torch.equal(w, base[n]), n  # step 2's check restored the start, bit for bit
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(traj.steps[1][name], base[name])  # training had moved it
    mon = RunManifest.load(run).safety["monitor"]
    assert mon["start_signal"] < 0  # the projection cannot fail: the rollbacks are the keyword signal's
    rollbacks = [e for e in mon["events"] if e["action"].startswith("rollback")]
    assert [e["step"] for e in rollbacks] == [2, 4] and mon["rollbacks"] == 2
    assert all(e["below"] == ["keyword"] and "keyword" in e and "signal" in e for e in rollbacks)
    assert [e["lr"] for e in rollbacks] == pytest.approx([1e-3 * 0.5, 1e-3 * 0.25])
    assert traj.lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])
    assert mon["start_keyword"] == rate


def test_keyword_signal_off_leaves_the_record_as_before(tiny_llama, tmp_path):
    d = negative_direction(tiny_llama, tmp_path / "dir")
    cfg = tiny_config(
        tiny_llama, max_steps=1, monitor_every=1, monitor_keyword_prompts=0, refusal_direction=str(d)
    )
    mon = RunManifest.load(train(cfg, tmp_path / "runs")).safety["monitor"]
    assert not [k for k in mon if "keyword" in k]
    assert all(set(e) == {"step", "signal", "action"} for e in mon["events"])
