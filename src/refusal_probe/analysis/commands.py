"""`refusal-probe analyze CKPT`: the main job."""

from __future__ import annotations

import argparse
from dataclasses import fields

from refusal_probe.analysis.pipeline import AnalyzeSettings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="measure refusal-direction drift and weight deltas at every checkpoint of a tree",
        description=(
            "Walk a checkpoint tree (one model dir, a run dir of checkpoint-<step>/ folders, or a folder of runs), "
            "choose the base model's refusal direction, and measure at every checkpoint how the direction drifted, "
            "how separable harmful and harmless prompts stay, and how much and where the weights moved. Writes tidy "
            "tables (CSV + Parquet), summary.json, plots (PNG + SVG) and report.md into --out. Cached per checkpoint: "
            "a re-run recomputes only what changed."
        ),
    )
    p.add_argument("ckpt", help="checkpoint tree, run dir or model dir")
    p.add_argument("--out", help="output folder (default: <ckpt>/analysis)")
    p.add_argument(
        "--base", help="base model spec (hub id, dir, .gguf, embedded name); default from run.json / adapter"
    )
    p.add_argument(
        "--behaviour",
        help="behaviour table to correlate with (default: <ckpt>/eval/behaviour.csv if present)",
    )
    p.add_argument(
        "--shard",
        help="i/n: compute only every n-th checkpoint starting at i (array jobs); a final plain "
        "run assembles the tables from the cache",
    )
    d = AnalyzeSettings()
    p.add_argument(
        "--n-prompts", type=int, default=d.n_prompts, help="harmful and harmless prompts each (default 128)"
    )
    p.add_argument(
        "--n-val",
        type=int,
        default=d.n_val,
        help="held-out prompts each for direction selection (default 32)",
    )
    p.add_argument(
        "--harmful", help="harmful prompts (.txt/.csv/.json/.jsonl); default: bundled, AdvBench removed"
    )
    p.add_argument(
        "--harmless", help="harmless prompts (.txt/.csv/.json/.jsonl); default: bundled Alpaca instructions"
    )
    p.add_argument(
        "--layer", type=int, help="use this layer for the base refusal direction instead of selecting"
    )
    p.add_argument(
        "--position", type=int, help="use this post-instruction position (negative offset, e.g. -1)"
    )
    p.add_argument(
        "--search",
        choices=("auto", "full", "coarse"),
        default=d.search,
        help="base direction search: every (layer, position) (full) or last position then the 3 best layers "
        "(coarse); auto = full on CUDA, coarse on CPU",
    )
    p.add_argument("--no-separability", action="store_true", help="skip the per-layer linear probes")
    p.add_argument("--no-deltas", action="store_true", help="skip weight deltas")
    p.add_argument("--seed", type=int, default=d.seed, help="prompt sampling and probe split seed")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="prompts per forward pass (default 16)"
    )
    p.add_argument(
        "--backend",
        choices=("hooks", "transformer-lens"),
        default=d.backend,
        help="activation capture: forward hooks (default) or transformer-lens 4 TransformerBridge",
    )
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1 ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_analyze)


def _analyze(args: argparse.Namespace) -> int:
    from refusal_probe.analysis.pipeline import analyze

    names = {f.name for f in fields(AnalyzeSettings)}
    values = {k: v for k, v in vars(args).items() if k in names}
    settings = AnalyzeSettings(
        **values,
        separability=not args.no_separability,
        deltas=not args.no_deltas,
        progress=not args.no_progress,
    )
    out = analyze(args.ckpt, args.out, args.base, settings, args.shard, args.behaviour)
    print(f"analysis written to {out}" + ("" if args.shard else f" (report: {out / 'report.md'})"))
    return 0
