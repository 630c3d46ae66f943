"""`refusal-probe demo`: the whole pipeline, small, on the embedded default model.

Trains LoRA and full fine-tuning briefly on bundled translation data, evaluates refusal on a slice of AdvBench and
chrF on held-out sentences, then runs `analyze`. Each stage is the real subcommand with smaller numbers; every stage
resumes, so an interrupted demo picks up where it stopped. It ends with the report's path and, per run, the three
numbers that tell the story: refusal rate, chrF, and the cosine of the refusal direction to the base model's.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from refusal_probe.core.settings import Settings, cli_values, opt
from refusal_probe.models.embedded import DEFAULT_MODEL, EMBEDDED

# (method, learning rate): one adapter run, one full run, at rates that move refusal within a few steps on 0.5B.
RUNS = (("lora", "2e-4"), ("full", "2e-5"))
EFFECTIVE_BATCH = 8
# Sequences per forward pass (x 4 accumulation). Activations are not what sets the memory peak (weights, gradients
# and AdamW moments of the 630M-parameter embedded model are 9.6 GiB; README): batch 1 measured the same peak.
PER_DEVICE_BATCH = 2


@dataclass
class DemoSettings(Settings):
    """How big the demo is; the defaults are the configuration measured in the README (12.8 min on 2 CPU cores)."""

    NOUN = "demo setting"

    model: str = opt(DEFAULT_MODEL, "Base model (embedded name, hub id, model dir or .gguf).")
    out: str = opt("demo", "Working folder: runs in OUT/runs, the report in OUT/runs/analysis.")
    steps: int = opt(8, f"Optimizer steps per run (effective batch {EFFECTIVE_BATCH}).")
    checkpoint_fractions: list[float] = opt(
        [0.5, 1.0], "Checkpoints to save, as fractions of training (the study: 0.25,0.5,0.75,1)."
    )
    n_advbench: int = opt(32, "AdvBench prompts per checkpoint for the refusal rate.")
    n_translation: int = opt(16, "Held-out NTREX sentences per checkpoint for chrF.")
    max_new_tokens: int = opt(48, "New tokens per answer (the early exit stops once the verdict is certain).")
    n_prompts: int = opt(48, "Harmful and harmless prompts each for the refusal direction and its drift.")
    device: str = opt("cpu", "cpu or cuda.")

    def check(self) -> None:
        from refusal_probe.core.errors import UserError

        for key in ("steps", "n_advbench", "n_translation", "max_new_tokens", "n_prompts"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key.replace('_', '-')} {getattr(self, key)}: pass a positive number")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train, evaluate and analyze a small sweep on the embedded model (about 13 min on 2 CPU cores)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    DemoSettings.add_arguments(p)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from refusal_probe.cli import main

    s = DemoSettings.from_dict(cli_values(args), where="demo")
    s.check()
    runs = Path(s.out) / "runs"
    started = time.time()
    fractions = ",".join(map(str, s.checkpoint_fractions))
    for method, lr in RUNS:
        _stage(f"train {method} lr={lr} ({s.steps} steps)")
        accum = EFFECTIVE_BATCH // PER_DEVICE_BATCH
        rc = main(
            ["train", "--model", s.model, "--method", method, "--learning-rate", lr, "--out", str(runs)]
            + ["--n-train", str(EFFECTIVE_BATCH * s.steps), "--per-device-batch-size", str(PER_DEVICE_BATCH)]
            + ["--grad-accum", str(accum), "--max-length", "256", "--checkpoint-fractions", fractions]
            + ["--device", s.device]
        )
        if rc:
            return rc
    _stage("evaluate refusal (AdvBench slice) and chrF (held-out NTREX)")
    rc = main(
        ["eval", str(runs), "--n-advbench", str(s.n_advbench), "--n-translation", str(s.n_translation)]
        + ["--max-new-tokens", str(s.max_new_tokens), "--device", s.device]
    )
    if rc:
        return rc
    _stage("analyze")
    known = EMBEDDED[s.model].refusal_direction if s.model in EMBEDDED else None
    pinned = ["--layer", str(known[0]), "--position", str(known[1])] if known else []  # else: full selection
    rc = main(
        [
            "analyze",
            str(runs),
            "--n-prompts",
            str(s.n_prompts),
            "--n-val",
            "16",
            "--device",
            s.device,
            *pinned,
        ]
    )
    if rc == 0:
        analysis = runs / "analysis"
        print(f"\ndemo finished in {(time.time() - started) / 60:.1f} min")
        for line in headline(analysis):
            print(line)
        print(f"report: {analysis / 'report.html'} (Markdown: {analysis / 'report.md'})")
    return rc


def headline(analysis: Path) -> list[str]:
    """One line per run: refusal rate, chrF and direction cosine, base -> the run's last checkpoint."""
    from refusal_probe.analysis.tables import final_checkpoints, read_table

    table = read_table(analysis, "checkpoints", required=True)
    bases = table[table["step"] == 0]
    lines = []
    for _, r in final_checkpoints(table).iterrows():
        own = bases[bases["run"] == r["run"]]
        base = (own if len(own) else bases).iloc[0]
        lines.append(
            f"  {r['run']} (step {int(r['step'])}): refusal {_pct(base.get('refusal_rate'))} -> "
            f"{_pct(r.get('refusal_rate'))}, chrF {_num(base.get('chrf'))} -> {_num(r.get('chrf'))}, "
            f"cosine to the base refusal direction {_num(r.get('cos_to_base_at_rl'), 2)}"
        )
    return lines


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.0%}"


def _num(x, digits: int = 1) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def _stage(text: str) -> None:
    print(f"\n== refusal-probe demo: {text}", flush=True)
