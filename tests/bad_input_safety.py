"""Bad-input cases of `project` (and train's weight-space safety options): each is refused with one line before
anything is written; the checkpoint, adapter and base stay as they were."""

from __future__ import annotations

from badinput import Case, Workspace


def _direction(ws: Workspace, d_model: int = 64) -> str:
    import pandas as pd
    import torch

    from refusal_probe.probe.direction_result import DirectionResult

    folder = ws.path(f"direction-{d_model}")
    if not folder.exists():
        directions = torch.ones(4, 1, d_model, dtype=torch.float64)
        scores = pd.DataFrame({"layer": [1], "position": [-1], "filtered_reason": ["none"]})
        DirectionResult(directions, 1, -1, directions[1, 0].clone(), scores).save(folder)
    return str(folder)


def _project(ws: Workspace, ckpt, *extra) -> list:
    return ["project", ckpt, "--out", ws.out / "projected", "--refusal-direction", _direction(ws), *extra]


CASES = [
    Case(
        "project-missing-checkpoint", lambda ws: _project(ws, ws.path("nope")), ("nope", "no such checkpoint")
    ),
    Case(
        "project-out-inside-checkpoint",
        lambda ws: ["project", ws.run() / "checkpoint-1", "--out", ws.run() / "checkpoint-1" / "p"],
        ("--out", "inside the checkpoint"),
    ),
    Case(
        "project-out-exists",
        lambda ws: ["project", ws.run() / "checkpoint-1", "--out", ws.model(), "--base", ws.model()],
        ("--out", "inside the base model"),
    ),
    Case(
        "project-full-without-base",
        lambda ws: _project(ws, ws.run(manifest=False) / "checkpoint-1"),
        ("no run.json", "--base"),
    ),
    Case(
        "project-direction-of-another-model",
        lambda ws: [*_project(ws, ws.run() / "checkpoint-1")[:-2], "--refusal-direction", _direction(ws, 32)],
        ("hidden size 64", "--refusal-direction"),
    ),
    Case(
        "project-no-direction-anywhere",
        lambda ws: ["project", ws.run() / "checkpoint-1", "--out", ws.out / "p"],
        ("refusal-probe directions", "--refusal-direction DIR"),
    ),
    Case(
        "project-adapter-without-writers",
        lambda ws: _project(ws, ws.adapter(), "--base", ws.model()),
        ("no module that writes the residual stream",),
    ),
    Case(
        "train-freeze-layers-bad-spec",
        lambda ws: [
            "train",
            "--model",
            ws.model(),
            "--device",
            "cpu",
            "--freeze-layers",
            "5-3",
            "--out",
            ws.out,
        ],
        ("--freeze-layers", "'5-3'"),
    ),
    Case(
        "train-ema-decay-out-of-range",
        lambda ws: ["train", "--model", ws.model(), "--device", "cpu", "--ema-decay", "1.5", "--out", ws.out],
        ("ema_decay=1.5", "--ema-decay"),
    ),
    Case(
        "train-monitor-keyword-prompts-negative",
        lambda ws: [
            "train",
            "--model",
            ws.model(),
            "--device",
            "cpu",
            "--safety-monitor",
            "--monitor-keyword-prompts",
            "-1",
            "--out",
            ws.out,
        ],
        ("monitor_keyword_prompts=-1", "--monitor-keyword-prompts"),
    ),
    Case(
        "train-project-without-direction",
        lambda ws: [
            "train",
            "--model",
            ws.model(),
            "--device",
            "cpu",
            "--method",
            "lora",
            "--project-off-refusal",
            "--out",
            ws.out,
        ],
        ("refusal-probe directions", "--refusal-direction DIR"),
    ),
]
