"""Bad-input cases of checkpoint trees and model folders (discovery and loading), driven through analyze and eval."""

from __future__ import annotations

import json

from badinput import Case, Workspace

FAST = ["--n-prompts", "4", "--n-val", "2", "--layer", "1", "--position", "-1", "--no-progress"]


def _no_weights(ws: Workspace):
    run = ws.run(steps=(1,))
    (run / "checkpoint-2").mkdir()
    ws.file("runs/full-lr1e-4/checkpoint-2/config.json", "{}")
    return run


def _pickle_only(ws: Workspace):
    run = ws.run(steps=(1,))
    ws.file("runs/full-lr1e-4/checkpoint-2/config.json", "{}")
    ws.file("runs/full-lr1e-4/checkpoint-2/pytorch_model.bin", b"\x80\x04not really a pickle")
    return run


def _corrupt(ws: Workspace, rel: str, content: str | bytes):
    run = ws.run(steps=(1,))
    ws.file(rel, content)
    return run


def _adapter_run(ws: Workspace, config: str | None = None):
    adapter = ws.adapter()
    if config is not None:
        (adapter / "adapter_config.json").write_text(config)
    return adapter.parent


def _adapter_over_adapter(ws: Workspace):
    first = ws.adapter("other/adapter")
    adapter = ws.adapter()
    ws.edit_json(adapter / "adapter_config.json", base_model_name_or_path=str(first))
    return adapter.parent


def _nan_weights(ws: Workspace):
    import torch
    from safetensors.torch import load_file, save_file

    run = ws.run(steps=(1, 2))
    weights = run / "checkpoint-2" / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[3]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return run


def _truncated(ws: Workspace):
    run = ws.run(steps=(1,))
    weights = run / "checkpoint-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return run


def _lone_checkpoint(ws: Workspace):
    run = ws.run(steps=(3,), manifest=False)
    ws.file(
        "runs/full-lr1e-4/checkpoint-3/trainer_state.json", json.dumps({"global_step": 3, "max_steps": 3})
    )
    return run / "checkpoint-3"


def _runs_without_base(ws: Workspace):
    ws.run("runs/a-full-lr1e-4", manifest=False)
    ws.run("runs/b-full-lr1e-5", manifest=False)
    return ws.path("runs")


def _output_folder(ws: Workspace):
    ws.file("old-analysis/.refusal-probe-output", "")
    ws.file("old-analysis/summary.json", "{}")
    return ws.path("old-analysis")


def _garbage_gguf(ws: Workspace):
    return ws.file("model.gguf", b"GGUF" + b"\x00" * 64)


CASES = [
    Case("analyze-missing-path", lambda ws: ["analyze", ws.path("nope"), *FAST], ("nope", "no such file")),
    Case("eval-missing-path", lambda ws: ["eval", ws.path("nope")], ("nope", "no such file")),
    Case(
        "analyze-local-looking-spec",
        lambda ws: ["analyze", "./nope/model", *FAST],
        ("./nope/model", "no such file"),
    ),
    Case(
        "analyze-missing-base",
        lambda ws: ["analyze", ws.run(), "--base", "./missing-base", *FAST],
        ("missing-base", "no such file"),
    ),
    Case(
        "analyze-empty-folder",
        lambda ws: ["analyze", ws.path("empty").mkdir() or ws.path("empty"), *FAST],
        ("empty", "no checkpoints found"),
    ),
    Case(
        "analyze-checkpoint-without-weights",
        lambda ws: ["analyze", _no_weights(ws), *FAST],
        ("checkpoint-2", "no safetensors weights"),
    ),
    Case(
        "eval-checkpoint-without-weights",
        lambda ws: ["eval", _no_weights(ws)],
        ("checkpoint-2", "no safetensors"),
    ),
    Case(
        "analyze-pickle-only-weights",
        lambda ws: ["analyze", _pickle_only(ws), *FAST],
        ("checkpoint-2", "never unpickles", "safe_serialization=True"),
    ),
    Case(
        "eval-pickle-only-weights", lambda ws: ["eval", _pickle_only(ws)], ("checkpoint-2", "never unpickles")
    ),
    Case(
        "analyze-corrupt-base-config",
        lambda ws: ["analyze", _corrupt(ws, "model/config.json", "{oops"), *FAST],
        ("model/config.json", "not valid JSON"),
    ),
    Case(
        "analyze-corrupt-checkpoint-config",
        lambda ws: ["analyze", _corrupt(ws, "runs/full-lr1e-4/checkpoint-1/config.json", "[1, 2"), *FAST],
        ("checkpoint-1/config.json", "not valid JSON"),
    ),
    Case(
        "analyze-adapter-config-not-json",
        lambda ws: ["analyze", _adapter_run(ws, "{not json"), *FAST],
        ("adapter_config.json", "not valid JSON"),
    ),
    Case(
        "eval-adapter-config-not-json",
        lambda ws: ["eval", _adapter_run(ws, "\x00\x01")],
        ("adapter_config.json", "not valid JSON"),
    ),
    Case(
        "analyze-adapter-config-a-list",
        lambda ws: ["analyze", _adapter_run(ws, "[1, 2]"), *FAST],
        ("adapter_config.json", "JSON object"),
    ),
    Case(
        "analyze-trainer-state-not-json",
        lambda ws: ["analyze", _corrupt(ws, "runs/full-lr1e-4/checkpoint-1/trainer_state.json", "{"), *FAST],
        ("trainer_state.json", "not valid JSON"),
    ),
    Case(
        "analyze-run-json-not-json",
        lambda ws: ["analyze", _corrupt(ws, "runs/full-lr1e-4/run.json", "{,}"), *FAST],
        ("run.json", "not valid JSON"),
    ),
    Case(
        "analyze-run-json-foreign-format",
        lambda ws: ["analyze", _corrupt(ws, "runs/full-lr1e-4/run.json", '{"format": "other/1"}'), *FAST],
        ("run.json", "refusal-probe/run/1"),
    ),
    Case(
        "analyze-lone-checkpoint-without-base",
        lambda ws: ["analyze", _lone_checkpoint(ws), *FAST],
        ("checkpoint-3", "pass --base"),
    ),
    Case("eval-lone-checkpoint-without-base", lambda ws: ["eval", _lone_checkpoint(ws)], ("pass --base",)),
    Case(
        "analyze-runs-without-base",
        lambda ws: ["analyze", _runs_without_base(ws), *FAST],
        ("no checkpoints found", "pass --base"),
    ),
    Case(
        "analyze-adapter-over-adapter",
        lambda ws: ["analyze", _adapter_over_adapter(ws), *FAST],
        ("itself an adapter", "--base"),
    ),
    Case(
        "analyze-output-folder-as-tree",
        lambda ws: ["analyze", _output_folder(ws), *FAST],
        ("old-analysis", "output folder"),
    ),
    Case(
        "analyze-a-plain-file",
        lambda ws: ["analyze", ws.file("notes.txt", "hi"), *FAST],
        ("notes.txt", "not a folder"),
    ),
    Case("analyze-garbage-gguf", lambda ws: ["analyze", _garbage_gguf(ws), *FAST], ("model.gguf",)),
    Case(
        "analyze-hub-unreachable-base",
        lambda ws: ["analyze", ws.run(), "--base", "some-org/not-cached-model", *FAST],
        ("some-org/not-cached-model", "pass the local folder"),
        env=(("HF_HUB_OFFLINE", "1"),),
    ),
    Case(
        "analyze-nan-weights",
        lambda ws: ["analyze", _nan_weights(ws), "--out", ws.out, *FAST],
        ("checkpoint-2", "NaN or inf", "training diverged"),
    ),
    Case(
        "eval-nan-weights",
        lambda ws: [
            "eval",
            _nan_weights(ws),
            "--out",
            ws.out,
            "--n-advbench",
            "1",
            "--n-translation",
            "0",
            "--no-progress",
        ],
        ("checkpoint-2", "NaN or inf"),
    ),
    Case(
        "analyze-truncated-weights",
        lambda ws: ["analyze", _truncated(ws), "--out", ws.out, *FAST],
        ("checkpoint-1/model.safetensors", "truncated"),
    ),
]


def _missing_tensor(ws: Workspace):
    from safetensors.torch import load_file, save_file

    run = ws.run(steps=(1, 2))
    weights = run / "checkpoint-2" / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return run


def _root_model_run(ws: Workspace):
    run = ws.run(steps=(1, 2))
    for f in ws.model().iterdir():  # the final model at the run's root, as Trainer.save_model() leaves it
        (run / f.name).write_bytes(f.read_bytes())
    return run


CASES += [
    Case(
        "eval-missing-tensor",
        lambda ws: [
            "eval",
            _missing_tensor(ws),
            "--out",
            ws.out,
            "--n-advbench",
            "1",
            "--n-translation",
            "0",
            "--no-progress",
        ],
        ("checkpoint-2", "model.layers.0.mlp.down_proj.weight", "missing from the weights"),
    ),
    Case(
        "analyze-missing-tensor",
        lambda ws: ["analyze", _missing_tensor(ws), "--out", ws.out, *FAST],
        ("checkpoint-2", "model.layers.0.mlp.down_proj.weight"),
    ),
    Case(
        "analyze-trainer-state-wrong-types",
        lambda ws: [
            "analyze",
            _corrupt(
                ws,
                "runs/full-lr1e-4/checkpoint-1/trainer_state.json",
                '{"global_step": "x", "log_history": 5}',
            ),
            *FAST,
        ],
        ("trainer_state.json", "wrong type"),
    ),
    Case(
        "analyze-adapter-config-not-json-with-base",
        lambda ws: ["analyze", _adapter_run(ws, "{not json"), "--base", ws.model(), *FAST],
        ("adapter_config.json", "not valid JSON"),
    ),
    Case(
        "analyze-out-is-the-run-with-its-final-model",
        lambda ws: ["analyze", _root_model_run(ws), "--out", ws.path("runs/full-lr1e-4"), *FAST],
        ("--out", "holds a model", "never written"),
    ),
    Case(
        "eval-out-inside-the-run-with-its-final-model",
        lambda ws: ["eval", _root_model_run(ws), "--out", ws.path("runs/full-lr1e-4/results")],
        ("--out", "holds a model"),
    ),
]
