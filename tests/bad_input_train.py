"""Bad-input cases of `train` and `sweep`: settings files and flags, run folders that may not be written, runs whose
settings changed. Every one is refused before any model is loaded (the workspace's runs and models stay as they were).
"""

from __future__ import annotations

from badinput import Case, Workspace

from refusal_probe.models.manifest import RunManifest


def _train(ws: Workspace, *extra: str, out=None, device: bool = True) -> list:
    """`train` of a tiny LoRA run on CPU (never reached in these cases: each is refused before loading)."""
    return [
        "train",
        "--model",
        ws.model(),
        "--method",
        "lora",
        *(["--device", "cpu"] if device else []),
        "--max-steps",
        "1",
        "--n-train",
        "2",
        "--out",
        out if out is not None else ws.out,
        *extra,
    ]


def _recorded_run(ws: Workspace, complete: bool, **changed) -> None:
    """runs/r as `train --run-name r` left it, but trained with ``changed`` settings."""
    from refusal_probe.train.base import resolve_hardware
    from refusal_probe.train.config import build_config
    from refusal_probe.train.lifecycle import base_record, hyperparameters

    model = ws.model()
    config = resolve_hardware(
        build_config(
            None, {"model": str(model), "method": "lora", "device": "cpu", "max_steps": 1, "n_train": 2}
        )
    )
    hp = {**hyperparameters(config), **changed}
    run = ws.run("runs/r", steps=(1,), manifest=False)
    RunManifest(
        run="r",
        method="lora",
        base_model=base_record(str(model)),
        learning_rate=hp["learning_rate"],
        hyperparameters=hp,
        total_steps=1,
        checkpoints={1: 1.0},
        complete=complete,
    ).save(run)


def _complete_other(ws: Workspace) -> list:
    _recorded_run(ws, complete=True, learning_rate=1e-4, lora_r=4)
    return _train(ws, "--run-name", "r", out=ws.path("runs"))


def _partial_other(ws: Workspace) -> list:
    _recorded_run(ws, complete=False, seed=7)
    return _train(ws, "--run-name", "r", out=ws.path("runs"))


def _sweep_file(ws: Workspace, body: str, out: str | None = None) -> list:
    head = f'[sweep]\nout = "{out or ws.out}"\n'
    base = f'[base]\nmodel = "{ws.model()}"\ndevice = "cpu"\nmax_steps = 1\nn_train = 2\n'
    return ["sweep", ws.file("sweep.toml", head + base + body)]


def _sweep_complete_other(ws: Workspace) -> list:
    _recorded_run(ws, complete=True, seed=7)
    ws.edit_json(ws.path("runs/r/run.json"), run="lora-lr5e-05")
    ws.path("runs/r").rename(ws.path("runs/lora-lr5e-05"))
    return _sweep_file(ws, '[grid]\nmethod = ["lora"]\n', out=str(ws.path("runs")))


def _blocked_out(ws: Workspace) -> list:
    ws.file("blocker", "a file where the output folder should go\n")
    return _train(ws, out=ws.path("blocker/runs"))


BAD_TOML_BYTES = b"learning_rate = 1e-4\n\x00\xff\xfe\x89PNG\r\n"

CASES = [
    # ---- a run folder that may not be written, a run whose settings changed ----
    Case(
        "train-complete-run-other-settings",
        _complete_other,
        (
            "runs/r",
            "complete run with other settings",
            "learning_rate 0.0001 -> 5e-05",
            "lora_r 4 -> 8",
            "--run-name",
            "remove that folder yourself",
        ),
    ),
    Case(
        "train-partial-run-other-settings",
        _partial_other,
        ("runs/r", "started with other settings", "seed 7 -> 42", "--run-name"),
    ),
    Case(
        "train-out-inside-checkpoint",
        lambda ws: _train(ws, out=ws.run("runs/r", steps=(1,)) / "checkpoint-1"),
        ("--out", "checkpoint-1", "never written", "pass --out DIR"),
    ),
    Case(
        "train-out-inside-run",
        lambda ws: _train(ws, out=ws.run("runs/r", steps=(1,))),
        ("--out", "runs/r", "run.json", "pass --out DIR"),
    ),
    Case(
        "train-out-below-run-checkpoint",
        lambda ws: _train(ws, out=ws.run("runs/r", steps=(1,)) / "checkpoint-1" / "deeper" / "still"),
        ("--out", "checkpoint-1", "never written"),
    ),
    Case(
        "train-out-inside-model",
        lambda ws: _train(ws, out=ws.model() / "runs"),
        ("--out", "holds a model", "pass --out DIR"),
    ),
    Case(
        "train-run-name-is-a-model-folder",
        lambda ws: _train(ws, "--run-name", "model", out=ws.root),
        ("model", "holds a model", "--run-name"),
    ),
    Case("train-out-unwritable", _blocked_out, ("--out", "blocker/runs", "cannot write", "pass --out DIR")),
    # ---- settings files ----
    Case(
        "train-config-binary",
        lambda ws: _train(ws, "--config", ws.file("c.toml", BAD_TOML_BYTES)),
        ("c.toml", "not valid TOML", "line 2"),
    ),
    Case(
        "train-config-invalid-toml",
        lambda ws: _train(ws, "--config", ws.file("c.toml", 'method = "lora"\nlearning_rate = 1e-4 5e-5\n')),
        ("c.toml", "not valid TOML", "line 2"),
    ),
    Case(
        "train-config-unknown-key",
        lambda ws: _train(ws, "--config", ws.file("c.toml", "lerning_rate = 1e-4\n")),
        ("c.toml", "lerning_rate", "did you mean 'learning_rate'"),
    ),
    Case(
        "train-config-missing",
        lambda ws: _train(ws, "--config", ws.path("nope.toml")),
        ("nope.toml", "not found"),
    ),
    Case(
        "train-config-per-method-unknown",
        lambda ws: _train(ws, "--config", ws.file("c.toml", "[per_method.sft]\nlora_r = 4\n")),
        ("c.toml", "per_method.sft", "full, lora, qlora, dpo"),
    ),
    Case(
        "train-config-bad-scheduler",
        lambda ws: _train(ws, "--config", ws.file("c.toml", 'lr_scheduler = "warmup_cosine"\n')),
        ("lr_scheduler='warmup_cosine'", "--lr-scheduler", "constant_with_warmup", "SchedulerType"),
    ),
    Case(
        "train-config-device-banana",
        lambda ws: _train(ws, "--config", ws.file("c.toml", 'device = "banana"\n'), device=False),
        ("device='banana'", "--device", "auto, cpu, cuda"),
    ),
    # ---- flags ----
    Case(
        "train-lr-scheduler-unknown",
        lambda ws: _train(ws, "--lr-scheduler", "cosin"),
        ("--lr-scheduler", "did you mean 'cosine'", "linear", "SchedulerType"),
    ),
    Case(
        "train-optimizer-unknown",
        lambda ws: _train(ws, "--optim", "adam"),
        ("--optim", "adamw_torch", "sgd", "OptimizerNames"),
    ),
    Case(
        "train-learning-rate-negative",
        lambda ws: _train(ws, "--learning-rate", "-1e-4"),
        ("--learning-rate", "-0.0001", "positive"),
    ),
    Case("train-device-banana", lambda ws: _train(ws, "--device", "banana"), ("--device", "banana", "cuda")),
    Case("train-method-unknown", lambda ws: _train(ws, "--method", "sft"), ("--method", "sft", "qlora")),
    Case(
        "train-keep-optimizer-unknown",
        lambda ws: _train(ws, "--keep-optimizer", "none"),
        ("--keep-optimizer",),
    ),
    Case("train-langs-unknown", lambda ws: _train(ws, "--langs", "de,xx"), ("--langs", "xx")),
    Case(
        "train-checkpoint-fractions",
        lambda ws: _train(ws, "--checkpoint-fractions", "0.5,1.5"),
        ("--checkpoint-fractions", "(0, 1]"),
    ),
    Case("train-max-steps-text", lambda ws: _train(ws, "--max-steps", "many"), ("max_steps='many'",)),
    Case(
        "train-model-missing",
        lambda ws: _train(ws, "--model", "./no-such-model"),
        ("./no-such-model", "no such file or folder"),
    ),
    Case(
        "train-model-is-adapter",
        lambda ws: _train(ws, "--model", ws.adapter()),
        ("checkpoint-1", "is a PEFT adapter", "full weights"),
    ),
    # ---- sweep files ----
    Case("sweep-file-missing", lambda ws: ["sweep", ws.path("nope.toml")], ("nope.toml", "not found")),
    Case(
        "sweep-file-binary",
        lambda ws: ["sweep", ws.file("s.toml", BAD_TOML_BYTES)],
        ("s.toml", "not valid TOML", "line 2"),
    ),
    Case(
        "sweep-grid-unknown-setting",
        lambda ws: _sweep_file(ws, "[grid]\nlearnig_rate = [1e-4]\n"),
        ("sweep.toml", "unknown setting 'learnig_rate'"),
    ),
    Case(
        "sweep-grid-not-a-list",
        lambda ws: _sweep_file(ws, '[grid]\nmethod = "lora"\n'),
        ("sweep.toml", "method must be a non-empty list"),
    ),
    Case(
        "sweep-grid-unknown-method",
        lambda ws: _sweep_file(ws, '[grid]\nmethod = ["lora", "sft"]\n'),
        ("method='sft'", "--method"),
    ),
    Case(
        "sweep-grid-value-type",
        lambda ws: _sweep_file(ws, '[grid]\nlearning_rate = ["fast"]\n'),
        ("learning_rate='fast'", "float"),
    ),
    Case(
        "sweep-grid-bad-optimizer",
        lambda ws: _sweep_file(ws, '[grid]\noptim = ["adamw_torch", "adam"]\n'),
        ("optim='adam'", "--optim", "OptimizerNames"),
    ),
    Case(
        "sweep-unknown-sweep-key",
        lambda ws: ["sweep", ws.file("s.toml", '[sweep]\noutput = "x"\n')],
        ("s.toml", "unknown key 'output'"),
    ),
    Case(
        "sweep-run-name-set",
        lambda ws: _sweep_file(ws, 'run_name = "x"\n[grid]\nmethod = ["lora"]\n'),
        ("sweep.toml", "remove run_name"),
    ),
    Case(
        "sweep-complete-run-other-settings",
        _sweep_complete_other,
        ("lora-lr5e-05", "complete run with other settings", "seed 7 -> 42"),
    ),
    Case(
        "sweep-out-inside-run",
        lambda ws: _sweep_file(ws, '[grid]\nmethod = ["lora"]\n', out=str(ws.run("runs/r", steps=(1,)))),
        ("--out", "runs/r", "run.json", "pass --out DIR"),
    ),
    Case(
        "sweep-dry-run-complete-run-other-settings",
        lambda ws: [*_sweep_complete_other(ws), "--dry-run"],
        ("lora-lr5e-05", "complete run with other settings"),
    ),
]
