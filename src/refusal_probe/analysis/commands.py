"""`refusal-probe analyze CKPT`: the main job. Every setting is a field of
:class:`~refusal_probe.analysis.settings.AnalyzeSettings`, whose description is its --help line."""

from __future__ import annotations

import argparse

from refusal_probe.analysis.settings import AnalyzeSettings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="measure refusal-direction drift and weight deltas at every checkpoint of a tree",
        description=(
            "Walk a checkpoint tree (one model dir, a run dir of checkpoint-<step>/ folders, or a folder of runs), "
            "choose the base model's refusal direction, and measure at every checkpoint how the direction drifted, "
            "how separable harmful and harmless prompts stay, and how much and where the weights moved. Writes tidy "
            "tables (CSV + Parquet), summary.json, plots (PNG + SVG) and report.md into --out. Cached per checkpoint: "
            "a re-run recomputes only what changed; the base direction is shared with `refusal-probe directions`."
        ),
    )
    p.add_argument("ckpt", help="checkpoint tree, run dir or model dir")
    p.add_argument(
        "--out", help="output folder (default: <tree>/analysis, or <model>-analysis beside a model folder)"
    )
    p.add_argument(
        "--base", help="base model spec (hub id, dir, .gguf, embedded name); default from run.json / adapter"
    )
    p.add_argument(
        "--behaviour",
        help="behaviour table to correlate with (default: the behaviour.csv of `refusal-probe eval`'s default "
        "output for the same tree, if present)",
    )
    p.add_argument(
        "--shard",
        help="i/n: compute only every n-th checkpoint starting at i (array jobs); a final plain "
        "run assembles the tables from the cache",
    )
    AnalyzeSettings.add_arguments(p)
    p.set_defaults(func=_analyze)
    r = sub.add_parser(
        "report",
        help="write the report again from an analysis folder's tables (no model is loaded)",
        description=(
            "Regenerate report.md, report.html (one self-contained file, figures embedded) and Figures 1 and 2 "
            "from the tables and summary.json that `refusal-probe analyze` wrote. TREE resolves to its default "
            "analysis folder."
        ),
    )
    r.add_argument(
        "target", metavar="TREE_OR_ANALYSIS_DIR", help="an analysis folder, or the tree it was made of"
    )
    r.add_argument(
        "--out", help="write the report (and copies of the figures) here instead of into the folder"
    )
    r.set_defaults(func=_report)


def _analyze(args: argparse.Namespace) -> int:
    from refusal_probe.analysis.pipeline import analyze
    from refusal_probe.core.settings import cli_values
    from refusal_probe.probe.settings import build

    settings = build(AnalyzeSettings, cli_values(args))
    out = analyze(args.ckpt, args.out, args.base, settings, args.shard, args.behaviour)
    if not args.shard:  # a shard only fills the cache; it says so itself
        print(f"analysis written to {out} (report: {out / 'report.md'})")
    return 0


def _report(args: argparse.Namespace) -> int:
    from refusal_probe.analysis.regenerate import regenerate

    md = regenerate(args.target, args.out)
    print(f"report written to {md.with_suffix('.html')} (and {md.name} beside it)")
    return 0
