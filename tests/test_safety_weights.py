"""Weight-space safety options (issue 9) on tiny random models: the refusal direction source, EMA, layer freezing,
projection off the refusal direction, and the safety monitor's rollback."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from refusal_probe.cli import main
from refusal_probe.core.errors import UserError
from refusal_probe.models.manifest import RunManifest
from refusal_probe.probe.direction_result import DirectionResult
from refusal_probe.train.config import TrainConfig
from refusal_probe.train.runner import train
from refusal_probe.train.safety.direction import refusal_direction
from refusal_probe.train.safety.ema import EMA_STATE, ema_update
from refusal_probe.train.safety.freeze import auto_layers, parse_layer_spec
from refusal_probe.train.safety.project import component, project_rows

D_MODEL, N_LAYERS = 64, 4  # the tiny models of conftest


def write_direction(folder: Path, d_model: int = D_MODEL, layer: int = 1, seed: int = 0) -> Path:
    """A `directions` folder with a random direction for a tiny model (only the files' format matters here)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(N_LAYERS, 2, d_model, generator=g, dtype=torch.float64)
    scores = pd.DataFrame({"layer": [layer], "position": [-1], "filtered_reason": [""]})
    DirectionResult(directions, layer, -1, directions[layer, 1].clone(), scores).save(folder)
    return folder


@pytest.fixture(scope="module")
def direction_dir(tmp_path_factory) -> Path:
    return write_direction(tmp_path_factory.mktemp("dir") / "direction")


# ---- direction source ----


def test_refusal_direction_from_a_folder(tiny_llama, direction_dir):
    cfg = TrainConfig(model=str(tiny_llama), refusal_direction=str(direction_dir))
    r = refusal_direction(cfg, tiny_llama)
    assert r.layer == 1 and r.unit.dtype == torch.float32 and r.unit.shape == (D_MODEL,)
    assert torch.linalg.vector_norm(r.unit).item() == pytest.approx(1.0, abs=1e-6)
    assert r.source == str(direction_dir)


def test_refusal_direction_refuses_another_models_direction(tiny_llama, tmp_path):
    cfg = TrainConfig(
        model=str(tiny_llama), refusal_direction=str(write_direction(tmp_path / "d", d_model=32))
    )
    with pytest.raises(UserError, match="hidden size 64"):
        refusal_direction(cfg, tiny_llama)


def test_refusal_direction_without_a_source_says_what_to_run(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="run `refusal-probe directions"):
        refusal_direction(TrainConfig(model=str(tiny_llama)), tiny_llama)
    with pytest.raises(UserError, match="no such folder"):
        refusal_direction(
            TrainConfig(model=str(tiny_llama), refusal_direction=str(tmp_path / "x")), tiny_llama
        )


def tiny_config(model: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(model),
        max_steps=4,
        per_device_batch_size=2,
        n_train=8,
        max_length=256,
        device="cpu",
        learning_rate=1e-3,
        lr_scheduler="constant",
        warmup_ratio=0.0,
    )
    return TrainConfig(**{**base, **kw})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    name = (
        "adapter_model.safetensors"
        if (folder / "adapter_model.safetensors").is_file()
        else "model.safetensors"
    )
    return load_file(str(folder / name))


class Trajectory(TrainerCallback):
    """The raw trainable weights after each step (runs before the safety callbacks, which are added later)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.steps.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        self.lrs.append(optimizer.param_groups[0]["lr"])  # the lr the next step will use


# ---- EMA ----


def test_ema_update_by_hand():
    shadow = {"w": torch.tensor([1.0, 2.0])}
    ema_update(shadow, {"w": torch.tensor([3.0, 0.0])}, 0.9)
    assert torch.allclose(shadow["w"], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 0]))
    ema_update(shadow, {"w": torch.tensor([0.0, 10.0])}, 0.5)
    assert torch.allclose(shadow["w"], torch.tensor([0.5 * 1.2, 0.5 * 1.8 + 5.0]))


def test_ema_checkpoints_hold_the_average_of_the_trajectory(tiny_llama, tmp_path):
    decay = 0.6
    traj = Trajectory()
    run = train(tiny_config(tiny_llama, method="full", ema_decay=decay), tmp_path / "runs", callbacks=[traj])
    base = load_file(str(tiny_llama / "model.safetensors"))
    names = list(traj.steps[0])
    shadow = {n: base[n].to(torch.float32).clone() for n in names}
    for step, raw in enumerate(traj.steps, start=1):
        shadow = {n: decay * shadow[n] + (1 - decay) * raw[n] for n in names}
        saved = weights(run / f"checkpoint-{step}")
        for n in names:
            assert torch.allclose(saved[n], shadow[n], atol=1e-6), (step, n)
        assert not torch.equal(saved[names[0]], raw[names[0]])  # the average, not the raw weights
    # training went on from the raw weights: step 2's raw weights are not an update of step 1's average
    manifest = RunManifest.load(run)
    assert manifest.safety["ema"]["decay"] == decay and manifest.hyperparameters["ema_decay"] == decay
    assert not list(run.glob(f"checkpoint-*/{EMA_STATE}"))  # complete: no resume state left


class StopAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt


def test_ema_run_resumes_to_the_same_averaged_weights(tiny_llama, tmp_path):
    cfg = tiny_config(tiny_llama, method="lora", ema_decay=0.7)
    straight = train(cfg, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", callbacks=[StopAfterSave()])
    run = tmp_path / "cut" / cfg.name
    assert (run / "checkpoint-2" / EMA_STATE).is_file()
    train(cfg, tmp_path / "cut")
    a, b = weights(straight / "checkpoint-4"), weights(run / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_ema_averages_the_lora_adapter(tiny_llama, tmp_path):
    traj = Trajectory()
    run = train(
        tiny_config(tiny_llama, method="lora", ema_decay=0.5, max_steps=2), tmp_path / "r", callbacks=[traj]
    )
    saved = weights(run / "checkpoint-2")
    b = next(n for n in traj.steps[0] if "lora_B" in n)
    # lora_B starts at zero: ema = 0.5 * (0.5 * 0 + 0.5 * B1) + 0.5 * B2
    expected = 0.25 * traj.steps[0][b] + 0.5 * traj.steps[1][b]
    key = next(k for k in saved if k.replace(".weight", "") in b.replace(".default.weight", ""))
    assert torch.allclose(saved[key], expected, atol=1e-7)


# ---- freezing ----


def test_parse_layer_spec():
    assert parse_layer_spec("3,4,7") == [3, 4, 7]
    assert parse_layer_spec("10-14") == [10, 11, 12, 13, 14]
    assert parse_layer_spec("1, 3-4") == [1, 3, 4]
    assert parse_layer_spec("AUTO") == "auto"
    for bad in ("", "a", "5-3", "-1", "1,,2"):
        with pytest.raises(UserError, match="--freeze-layers"):
            parse_layer_spec(bad)
    assert auto_layers(1, 2, 4) == [0, 1, 2, 3] and auto_layers(3, 1, 4) == [2, 3]


def test_frozen_layers_are_bit_identical_after_training(tiny_llama, tmp_path, direction_dir):
    run = train(
        tiny_config(
            tiny_llama,
            method="full",
            freeze_layers="auto",
            freeze_neighbourhood=0,
            refusal_direction=str(direction_dir),
        ),
        tmp_path / "runs",
    )
    base = load_file(str(tiny_llama / "model.safetensors"))
    saved = weights(run / "checkpoint-4")
    frozen = [n for n in saved if ".layers.1." in n]
    moved = [n for n in saved if ".layers.2." in n and "proj" in n]
    assert frozen and all(torch.equal(saved[n], base[n]) for n in frozen)
    assert moved and all(not torch.equal(saved[n], base[n]) for n in moved)
    info = RunManifest.load(run).safety["freeze_layers"]
    assert info["layers"] == [1] and "layer 1" in info["why"]


def test_freezing_lora_blocks_keeps_their_adapter_at_init(tiny_llama, tmp_path):
    traj = Trajectory()
    train(
        tiny_config(tiny_llama, method="lora", freeze_layers="0-2", max_steps=2),
        tmp_path / "r",
        callbacks=[traj],
    )
    assert traj.steps[0] and all(".layers.3." in n for n in traj.steps[0])


def test_freezing_every_layer_is_refused(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="every trainable parameter"):
        train(tiny_config(tiny_llama, method="lora", freeze_layers="0-3"), tmp_path / "r")
    with pytest.raises(UserError, match="layer 9 does not exist"):
        train(tiny_config(tiny_llama, method="lora", freeze_layers="9"), tmp_path / "r2")


# ---- projection off the refusal direction ----


def test_project_rows_removes_exactly_the_component_along_r():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(8, generator=g, dtype=torch.float64)
    r = r / r.norm()
    delta = torch.randn(8, 5, generator=g, dtype=torch.float64)
    out = project_rows(delta, r, 0)
    assert component(out, r, 0).abs().max() < 1e-12
    assert torch.allclose(delta - out, torch.outer(r, r @ delta))  # only the r component went
    orth = delta - torch.outer(r, r @ delta)
    assert torch.allclose(project_rows(orth, r, 0), orth)  # nothing along r: untouched
    conv = torch.randn(5, 8, generator=g, dtype=torch.float64)  # Conv1D [in, out]
    assert component(project_rows(conv, r, 1), r, 1).abs().max() < 1e-12
    bias = torch.randn(8, generator=g, dtype=torch.float64)
    assert abs(float(r @ project_rows(bias, r))) < 1e-12
    # LoRA: r^T (P B) A = 0 for any A
    b, a = (
        torch.randn(8, 2, generator=g, dtype=torch.float64),
        torch.randn(2, 5, generator=g, dtype=torch.float64),
    )
    assert (r @ (project_rows(b, r, 0) @ a)).abs().max() < 1e-12


def _unit(direction_dir: Path) -> torch.Tensor:
    return DirectionResult.load(direction_dir).unit.to(torch.float32)


def test_full_training_with_projection_leaves_no_update_along_r(tiny_llama, tmp_path, direction_dir):
    run = train(
        tiny_config(
            tiny_llama, method="full", project_off_refusal=True, refusal_direction=str(direction_dir)
        ),
        tmp_path / "runs",
    )
    r = _unit(direction_dir)
    base = load_file(str(tiny_llama / "model.safetensors"))
    saved = weights(run / "checkpoint-4")
    writers = [n for n in saved if n.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(writers) == 2 * N_LAYERS
    for n in writers:
        delta = saved[n] - base[n]
        assert delta.abs().max() > 1e-5  # it trained
        assert (r @ delta).abs().max() < 1e-6 * max(1.0, delta.abs().max().item()), n
    info = RunManifest.load(run).safety["project_off_refusal"]
    assert len(info["modules"]) == 2 * N_LAYERS and info["max_abs_component"] < 1e-5


def test_lora_training_with_projection_keeps_r_transpose_b_zero(tiny_llama, tmp_path, direction_dir):
    run = train(
        tiny_config(
            tiny_llama,
            method="lora",
            lora_targets=["qlora-all"],
            project_off_refusal=True,
            refusal_direction=str(direction_dir),
        ),
        tmp_path / "runs",
    )
    r = _unit(direction_dir)
    saved = weights(run / "checkpoint-4")
    bs = [n for n in saved if "lora_B" in n and ("o_proj" in n or "down_proj" in n)]
    assert len(bs) == 2 * N_LAYERS
    for n in bs:
        assert saved[n].abs().max() > 0  # it trained
        assert (r @ saved[n]).abs().max() < 1e-6, n
    readers = [n for n in saved if "lora_B" in n and "up_proj" in n]
    assert readers and all((saved[n]).abs().max() > 0 for n in readers)


def test_projection_needs_a_lora_target_that_writes_the_stream(tiny_llama, direction_dir):
    cfg = tiny_config(tiny_llama, method="lora", lora_targets=["q_proj", "v_proj"], project_off_refusal=True)
    with pytest.raises(UserError, match="nothing to project"):
        cfg.validate()


# ---- safety monitor ----


def positive_direction(model_dir: Path, folder: Path, layer: int = 1) -> Path:
    """A direction along the base's own mean harmful activation: the monitor's starting signal is positive."""
    from refusal_probe import data
    from refusal_probe.models.source import load_model
    from refusal_probe.probe.activations import capture

    model, tok = load_model(model_dir, device="cpu")
    acts = capture(model, tok, data.harmful_val()[:4], progress=False)
    mean = acts.mean[:, acts.index(-1)]  # [L, d]
    directions = mean[:, None, :].repeat(1, 2, 1)
    scores = pd.DataFrame({"layer": [layer], "position": [-1], "filtered_reason": [""]})
    DirectionResult(directions, layer, -1, mean[layer].clone(), scores).save(folder)
    return folder


def test_monitor_rollback_restores_the_exact_weights_and_lowers_the_lr(tiny_llama, tmp_path):
    d = positive_direction(tiny_llama, tmp_path / "dir")
    cfg = tiny_config(
        tiny_llama,
        method="full",
        safety_monitor=True,
        monitor_every=2,
        monitor_tolerance=10.0,  # the signal is never 10x its start: every check rolls back
        monitor_lr_factor=0.5,
        monitor_prompts=4,
        refusal_direction=str(d),
    )
    traj = Trajectory()
    run = train(cfg, tmp_path / "runs", callbacks=[traj])
    base = load_file(str(tiny_llama / "model.safetensors"))
    # step 2's check rolled back to the start: checkpoint-2 holds the base weights, bit for bit
    for n, w in weights(run / "checkpoint-2").items():
        if n in traj.steps[0]:
            assert torch.equal(w, base[n]), n
    assert not torch.equal(
        traj.steps[1]["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"]
    )
    mon = RunManifest.load(run).safety["monitor"]
    rollbacks = [e for e in mon["events"] if e["action"].startswith("rollback")]
    assert [e["step"] for e in rollbacks] == [2, 4] and mon["rollbacks"] == 2
    assert rollbacks[0]["lr"] == pytest.approx(1e-3 * 0.5) and rollbacks[1]["lr"] == pytest.approx(
        1e-3 * 0.25
    )
    assert mon["start_signal"] > 0 and 0 < mon["monitor_s"] < mon["train_s"]
    # the scheduler's base lr was lowered too: step 3 ran at half the rate (constant schedule)
    assert traj.lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])


def test_monitor_that_never_triggers_keeps_training(tiny_llama, tmp_path):
    d = positive_direction(tiny_llama, tmp_path / "dir")
    cfg = tiny_config(
        tiny_llama,
        method="lora",
        safety_monitor=True,
        monitor_every=1,
        monitor_tolerance=1e-9,
        monitor_prompts=2,
        max_steps=2,
        refusal_direction=str(d),
        ema_decay=0.9,
    )
    run = train(cfg, tmp_path / "runs")
    mon = RunManifest.load(run).safety["monitor"]
    assert [e["action"] for e in mon["events"]] == ["start", "ok", "ok"]


# ---- `refusal-probe project` after the fact ----


def test_project_command_on_a_full_checkpoint(tiny_llama, tmp_path, direction_dir):
    run = train(tiny_config(tiny_llama, method="full", max_steps=1), tmp_path / "runs")
    ckpt = run / "checkpoint-1"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    out = tmp_path / "projected"
    assert main(["project", str(ckpt), "--out", str(out), "--refusal-direction", str(direction_dir)]) == 0
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before  # the user's, untouched
    r = _unit(direction_dir)
    base, trained, new = load_file(str(tiny_llama / "model.safetensors")), weights(ckpt), weights(out)
    for n in new:
        if n.endswith(("o_proj.weight", "down_proj.weight")):
            assert (r @ (new[n] - base[n])).abs().max() < 1e-6, n
            assert (r @ (trained[n] - base[n])).abs().max() > 1e-6  # there was something to remove
        else:
            assert torch.equal(new[n], trained[n]), n
    assert not (out / "optimizer.pt").exists() and (out / "config.json").is_file()
    assert json.loads((out / "projection.json").read_text())["kind"] == "full"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".projected.")]  # no temp folder left
    # the base came from run.json; the new folder loads as a model
    from refusal_probe.models.source import load_model

    load_model(out, device="cpu")


def test_project_command_on_a_lora_adapter(tiny_llama, tmp_path, direction_dir):
    run = train(
        tiny_config(tiny_llama, method="lora", max_steps=1, lora_targets=["qlora-all"]), tmp_path / "r"
    )
    out = tmp_path / "projected"
    argv = ["project", str(run / "checkpoint-1"), "--out", str(out), "--base", str(tiny_llama)]
    assert main([*argv, "--refusal-direction", str(direction_dir)]) == 0
    r = _unit(direction_dir)
    new, old = weights(out), weights(run / "checkpoint-1")
    bs = [n for n in new if "lora_B" in n and ("o_proj" in n or "down_proj" in n)]
    assert len(bs) == 2 * N_LAYERS and all((r @ new[n]).abs().max() < 1e-6 for n in bs)
    assert all(torch.equal(new[n], old[n]) for n in new if n not in bs)
    assert (out / "adapter_config.json").is_file()


# ---- composition with the other methods ----


@pytest.mark.parametrize(
    ("method", "extra"),
    [("dpo", {}), ("qlora", {"lora_targets": ["qlora-all"]}), ("dpo", {"dpo_lora": True})],
)
def test_every_weight_space_option_at_once(method, extra, tiny_llama, tmp_path):
    d = positive_direction(tiny_llama, tmp_path / "dir")
    cfg = tiny_config(
        tiny_llama,
        method=method,
        max_steps=2,
        ema_decay=0.9,
        freeze_layers="0",
        project_off_refusal=True,
        safety_monitor=True,
        monitor_every=1,
        monitor_tolerance=1e-9,
        monitor_prompts=2,
        refusal_direction=str(d),
        **extra,
    )
    run = train(cfg, tmp_path / "runs")
    safety = RunManifest.load(run).safety
    assert safety["freeze_layers"]["layers"] == [0] and safety["ema"]["decay"] == 0.9
    assert safety["project_off_refusal"]["max_abs_component"] < 1e-5
    assert [e["action"] for e in safety["monitor"]["events"]] == ["start", "ok", "ok"]
    saved = weights(run / "checkpoint-2")
    r = DirectionResult.load(d).unit.to(torch.float32)
    if cfg.uses_lora:
        bs = [n for n in saved if "lora_B" in n and ("o_proj" in n or "down_proj" in n)]
        assert bs and all((r @ saved[n].float()).abs().max() < 1e-5 for n in bs)
        assert all(saved[n].abs().max() == 0 for n in saved if "lora_B" in n and ".layers.0." in n)
    else:
        base = load_file(str(tiny_llama / "model.safetensors"))
        assert all(torch.equal(saved[n], base[n]) for n in saved if ".layers.0." in n)
        for n in saved:
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                assert (r @ (saved[n] - base[n])).abs().max() < 1e-5, n


def test_refusal_direction_from_the_shared_cache_that_directions_filled(tiny_llama, tmp_path):
    """`refusal-probe directions MODEL` with its default settings fills the cache; train then finds it there."""
    out = tmp_path / "directions"
    assert main(["directions", str(tiny_llama), "--out", str(out), "--search", "coarse", "--quiet"]) == 0
    r = refusal_direction(TrainConfig(model=str(tiny_llama)), tiny_llama)
    saved = DirectionResult.load(out)
    assert r.layer == saved.layer and torch.allclose(r.unit, saved.unit.to(torch.float32))
    assert "directions" in r.source and str(out) not in r.source  # the cache entry, not the --out folder


def test_a_resumed_monitor_keeps_its_starting_signal_and_events(tiny_llama, tmp_path):
    d = positive_direction(tiny_llama, tmp_path / "dir")
    cfg = tiny_config(
        tiny_llama,
        method="lora",
        safety_monitor=True,
        monitor_every=1,
        monitor_tolerance=1e-9,
        monitor_prompts=2,
        refusal_direction=str(d),
    )
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "runs", callbacks=[StopAfterSave()])
    first = RunManifest.load(tmp_path / "runs" / cfg.name).safety["monitor"]
    run = train(cfg, tmp_path / "runs")
    mon = RunManifest.load(run).safety["monitor"]
    assert mon["start_signal"] == first["start_signal"]
    assert [e["action"] for e in mon["events"]] == ["start", "ok", "ok", "resume", "ok", "ok"]
    assert [e["step"] for e in mon["events"]] == [0, 1, 2, 2, 3, 4]
