"""`refusal-probe train` (one run) and `refusal-probe sweep` (a grid of runs). Heavy imports wait for the handlers."""

from __future__ import annotations

import argparse
import shlex

from refusal_probe.core.settings import cli_values
from refusal_probe.train import config as tconfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model (full | lora | qlora | dpo) and save checkpoints at fractions of training",
        description="Fine-tune a chat model for X->English translation and write <out>/<run>/checkpoint-<step>/ "
        "(HF Trainer layout) at the configured fractions of training, plus <out>/<run>/run.json. "
        "Settings come from the defaults, then --config FILE, then the flags below. A complete run with the "
        "same settings is skipped (with other settings it is refused); an interrupted one resumes from its last "
        "checkpoint. A run folder inside another run, checkpoint or model folder is refused.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="TOML file of settings (top-level keys or [base], plus [per_method.<method>]); a sweep file "
        "works too (its [grid] is ignored)",
    )
    p.add_argument("--out", metavar="DIR", default="runs", help="folder that receives the run folder")
    p.add_argument(
        "--show-config",
        action="store_true",
        help="print the resolved settings as TOML and exit without training",
    )
    tconfig.add_arguments(p)
    p.set_defaults(func=_train)

    s = subparsers.add_parser(
        "sweep",
        help="run (or print commands for) a grid of training runs from a TOML file",
        description="Expand [grid] (methods x learning rates x any other setting) over [base] and train each run "
        "in turn, skipping complete runs and resuming partial ones. See experiments/README.md.",
    )
    s.add_argument("file", metavar="FILE", help="sweep TOML, e.g. experiments/cpu-small.toml")
    s.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="where the runs go (default: [sweep] out, else runs/<file stem>)",
    )
    s.add_argument(
        "--print-commands",
        action="store_true",
        help="print one `refusal-probe train ...` command per run (for a cluster) and exit",
    )
    s.add_argument(
        "--accelerate",
        action="store_true",
        help="use `accelerate launch -m refusal_probe.cli train ...` (several GPUs): in printed commands, "
        "and to launch each run",
    )
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="list the runs with their state (new / resume from checkpoint-N / complete) and exit",
    )
    s.set_defaults(func=_sweep)


def _train(args: argparse.Namespace) -> int:
    config = tconfig.build_config(args.config, cli_values(args))
    if args.show_config:
        print(config.to_toml(), end="")
        return 0
    from refusal_probe.train.runner import train

    run_dir = train(config, args.out)
    print(run_dir)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from refusal_probe.train.sweep import expand, load_sweep, preflight, run_sweep, status_line, train_command

    sweep = load_sweep(args.file, args.out)
    runs = expand(sweep)
    if args.print_commands:
        for run in runs:
            print(shlex.join(train_command(sweep, run, accelerate=args.accelerate)))
        return 0
    if args.dry_run:
        preflight(sweep, runs)
        width = max(len(r.name) for r in runs)
        for run in runs:
            print(f"{run.name:<{width}}  {status_line(sweep, run)}")
        print(f"{len(runs)} runs in {sweep.out}")
        return 0
    for path in run_sweep(sweep, runs, accelerate=args.accelerate):
        print(path)
    return 0
