"""`refusal-probe demo`: the whole pipeline, small, on the embedded default model.

Trains LoRA and full fine-tuning briefly on bundled translation data, evaluates refusal on a slice of AdvBench and
chrF on held-out sentences, then runs `analyze`. Each stage is the real subcommand with smaller numbers; every stage
resumes, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from refusal_probe.models.embedded import DEFAULT_MODEL, EMBEDDED

# (method, learning rate): one adapter run, one full run, at rates that move refusal within a few steps on 0.5B.
RUNS = (("lora", "2e-4"), ("full", "2e-5"))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train, evaluate and analyze a small sweep on the embedded model (roughly 30 min on 2 CPU cores)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model (default: {DEFAULT_MODEL})")
    p.add_argument(
        "--out", default="demo", help="working folder: runs in OUT/runs, report in OUT/runs/analysis"
    )
    p.add_argument(
        "--steps", type=int, default=8, help="optimizer steps per run (effective batch 8; default 8)"
    )
    p.add_argument("--n-advbench", type=int, default=32, help="AdvBench prompts per checkpoint (default 32)")
    p.add_argument(
        "--n-prompts", type=int, default=64, help="harmful/harmless prompts each for analyze (default 64)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from refusal_probe.cli import main

    runs = Path(args.out) / "runs"
    started = time.time()
    for method, lr in RUNS:
        _stage(f"train {method} lr={lr}")
        rc = main(
            [
                "train",
                "--model",
                args.model,
                "--method",
                method,
                "--learning-rate",
                lr,
                "--out",
                str(runs),
                "--n-train",
                str(8 * args.steps),
                "--per-device-batch-size",
                "4",
                "--grad-accum",
                "2",
                "--max-length",
                "256",
                "--device",
                args.device,
            ]
        )
        if rc:
            return rc
    _stage("evaluate refusal (AdvBench slice) and chrF (held-out NTREX)")
    rc = main(
        [
            "eval",
            str(runs),
            "--n-advbench",
            str(args.n_advbench),
            "--n-translation",
            "16",
            "--max-new-tokens",
            "64",
            "--device",
            args.device,
        ]
    )
    if rc:
        return rc
    _stage("analyze")
    known = EMBEDDED[args.model].refusal_direction if args.model in EMBEDDED else None
    pinned = ["--layer", str(known[0]), "--position", str(known[1])] if known else []  # else: full selection
    rc = main(
        [
            "analyze",
            str(runs),
            "--n-prompts",
            str(args.n_prompts),
            "--n-val",
            "16",
            "--device",
            args.device,
            *pinned,
        ]
    )
    if rc == 0:
        print(
            f"\ndemo finished in {(time.time() - started) / 60:.1f} min; open {runs / 'analysis' / 'report.md'}"
        )
    return rc


def _stage(text: str) -> None:
    print(f"\n== refusal-probe demo: {text}", flush=True)
