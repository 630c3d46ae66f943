"""Sweeps: grid expansion, per-method settings, printed commands that reproduce each run, skip and resume."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from refusal_probe.cli import build_parser, main
from refusal_probe.core.errors import UserError
from refusal_probe.core.settings import cli_values
from refusal_probe.models.manifest import RunManifest
from refusal_probe.train.config import build_config
from refusal_probe.train.sweep import expand, load_sweep, train_command

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_cpu_small_expands_to_every_method_and_rate():
    sweep = load_sweep(EXPERIMENTS / "cpu-small.toml")
    runs = expand(sweep)
    assert [r.name for r in runs] == [
        f"{m}-lr{lr}" for m in ("full", "lora", "qlora", "dpo") for lr in ("0.0001", "1e-05")
    ]
    assert sweep.out == Path("runs/cpu-small")
    by_name = {r.name: r.config for r in runs}
    assert by_name["dpo-lr0.0001"].per_device_batch_size == 4 and by_name["dpo-lr0.0001"].grad_accum == 2
    assert by_name["lora-lr1e-05"].per_device_batch_size == 8
    assert all(
        c.effective_batch_size == 8 and c.model == "qwen2.5-coder-0.5b-instruct" for c in by_name.values()
    )
    assert all(c.n_train // c.effective_batch_size == 8 for c in by_name.values())  # 8 steps per run


def test_kim_tradeoff_varies_rate_batch_and_steps_at_fixed_data():
    runs = expand(load_sweep(EXPERIMENTS / "kim-tradeoff.toml"))
    got = {(r.config.learning_rate, r.config.effective_batch_size, r.config.max_steps) for r in runs}
    assert got == {(lr, bs, steps) for lr in (1e-5, 5e-6) for bs in (8, 16) for steps in (4, 8)}
    assert {r.config.n_train for r in runs} == {128} and {r.config.method for r in runs} == {"full"}
    # every step budget fits inside the fixed data: no run repeats a sentence
    assert all(r.config.max_steps * r.config.effective_batch_size <= r.config.n_train for r in runs)
    assert len({r.name for r in runs}) == 8


def test_paper_sweep_is_the_study_grid():
    runs = expand(load_sweep(EXPERIMENTS / "paper.toml"))
    assert len(runs) == 16
    assert {(r.config.method, r.config.learning_rate) for r in runs} == {
        (m, lr) for m in ("full", "lora", "qlora", "dpo") for lr in (1e-4, 5e-5, 1e-5, 5e-6)
    }
    cfg = {r.name: r.config for r in runs}
    assert cfg["lora-lr5e-05"].lora_modules() == ["q_proj", "v_proj"]
    assert cfg["qlora-lr5e-05"].lora_modules() == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert all(
        c.model == "meta-llama/Llama-3.2-1B-Instruct"
        and c.train_data == "mt-pref"
        and c.epochs == 1
        and c.effective_batch_size == 8
        and c.checkpoint_fractions == [0.25, 0.5, 0.75, 1.0]
        for c in cfg.values()
    )
    assert cfg["dpo-lr5e-05"].dpo_lora is False and cfg["dpo-lr5e-05"].dpo_beta == 0.1


def test_extra_grid_settings_name_the_runs(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(
        '[grid]\nmethod = ["lora"]\nlearning_rate = [1e-4]\nseed = [1, 2]\nprompt_format = ["seed", '
        '"instructed"]\n'
    )
    runs = expand(load_sweep(f))
    assert [r.name for r in runs] == [
        "lora-lr0.0001-seed1-promptformatseed",
        "lora-lr0.0001-seed1-promptformatinstructed",
        "lora-lr0.0001-seed2-promptformatseed",
        "lora-lr0.0001-seed2-promptformatinstructed",
    ]
    assert [r.config.seed for r in runs] == [1, 1, 2, 2]
    assert load_sweep(f).out == Path("runs/s")


@pytest.mark.parametrize(
    "body, message",
    [
        ("[grid]\nlearnig_rate = [1e-4]\n", "unknown setting 'learnig_rate'"),
        ('[grid]\nmethod = "lora"\n', "must be a non-empty list"),
        ('[grid]\nmethod = ["lora", "sft"]\n', "method='sft'"),
        ('[base]\nrun_name = "x"\n[grid]\nmethod = ["lora"]\n', "remove run_name"),
        ('[sweep]\noutput = "x"\n', "unknown key 'output'"),
        ("[grid]\nlearning_rate = [1e-4, 0.0001]\n", "share the run name"),
        ("[per_method.sft]\nlora_r = 4\n", "names no method"),
    ],
)
def test_bad_sweep_files_fail_before_training(tmp_path, body, message):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(UserError, match=message):
        expand(load_sweep(f))


def test_printed_commands_rebuild_the_same_configs(capsys):
    path = EXPERIMENTS / "cpu-small.toml"
    assert main(["sweep", str(path), "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    runs = expand(load_sweep(path))
    assert len(lines) == len(runs)
    parser = build_parser()
    for line, run in zip(lines, runs, strict=True):
        argv = shlex.split(line)
        assert argv[:2] == ["refusal-probe", "train"]
        args = parser.parse_args(argv[1:])
        assert build_config(args.config, cli_values(args)) == run.config
        assert args.out == "runs/cpu-small"
    assert main(["sweep", str(path), "--print-commands", "--accelerate", "--out", "/scratch/x"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert (
        first.startswith("accelerate launch -m refusal_probe.cli train --config ")
        and "--out /scratch/x" in first
    )


def test_sweep_trains_then_skips_and_reports_state(tiny_llama, tmp_path, capsys):
    f = tmp_path / "tiny.toml"
    f.write_text(
        f'[sweep]\nout = "{tmp_path / "runs"}"\n'
        f'[base]\nmodel = "{tiny_llama}"\nmax_steps = 2\nper_device_batch_size = 2\nn_train = 4\n'
        'max_length = 256\ncheckpoint_fractions = [0.5, 1.0]\ndevice = "cpu"\n'
        '[grid]\nmethod = ["lora"]\nlearning_rate = [1e-4, 1e-5]\n'
    )
    # checkpoint folders of a killed run: the Trainer writes trainer_state.json last, so it marks a finished one
    partial = tmp_path / "runs" / "lora-lr1e-05"
    (partial / "checkpoint-1").mkdir(parents=True)
    (partial / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (partial / "checkpoint-2").mkdir()
    assert main(["sweep", str(f), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "lora-lr0.0001  new" in out
        and "lora-lr1e-05   resume from checkpoint-1" in out
        and "2 runs in" in out
    )
    shutil.rmtree(partial)

    assert main(["sweep", str(f)]) == 0
    for name in ("lora-lr0.0001", "lora-lr1e-05"):
        m = RunManifest.load(tmp_path / "runs" / name)
        assert m.complete and m.checkpoints == {1: 0.5, 2: 1.0}
    capsys.readouterr()
    assert main(["sweep", str(f), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("complete") == 2
    assert main(["sweep", str(f)]) == 0
    assert capsys.readouterr().out.count("complete, skipped") == 2


def test_train_command_shape():
    sweep = load_sweep(EXPERIMENTS / "cpu-small.toml")
    run = expand(sweep)[0]
    cmd = train_command(sweep, run)
    assert cmd[:4] == ["refusal-probe", "train", "--config", str(sweep.path)]
    assert cmd[cmd.index("--run-name") + 1] == run.name


def test_sweep_refuses_a_later_run_before_the_first_trains(tiny_llama, tmp_path, capsys):
    """Run 2's folder holds a complete run with other settings: the sweep is refused before run 1 is trained."""
    from refusal_probe.train.lifecycle import base_record, hyperparameters
    from refusal_probe.train.runner import prepare

    f = tmp_path / "tiny.toml"
    f.write_text(
        f'[sweep]\nout = "{tmp_path / "runs"}"\n'
        f'[base]\nmodel = "{tiny_llama}"\nmax_steps = 1\nn_train = 2\ndevice = "cpu"\n'
        '[grid]\nmethod = ["lora"]\nlearning_rate = [1e-4, 1e-5]\n'
    )
    second = expand(load_sweep(f))[1]
    config, _ = prepare(second.config, tmp_path / "runs")
    RunManifest(
        run=second.name,
        method="lora",
        base_model=base_record(str(tiny_llama)),
        hyperparameters={**hyperparameters(config), "seed": 7},
        complete=True,
    ).save(tmp_path / "runs" / second.name)
    assert main(["sweep", str(f)]) == 2
    err = capsys.readouterr().err
    assert "lora-lr1e-05: a complete run with other settings is there (seed 7 -> 42)" in err
    assert not (tmp_path / "runs" / "lora-lr0.0001").exists()
    assert main(["sweep", str(f), "--dry-run"]) == 2
