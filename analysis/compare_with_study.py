"""The study's claims against an analysed sweep: each comparison with its 95% interval and a verdict.

    python analysis/compare_with_study.py experiments/results/cpu-small/analysis --n 32 --out analysis/results/cpu-small-n32

Reads ``checkpoints.csv`` that `refusal-probe analyze` wrote (refusal_rate joined from `refusal-probe eval`); ``--n``
is the number of AdvBench prompts each rate was judged on. Writes ``claims.csv``, ``claims.md`` and the forest plot
``claims.png`` / ``claims.svg`` (each comparison's estimate and 95% interval against the claim's threshold) under
``--out``.
The comparisons and their intervals: ``refusal_probe.analysis.claims``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from refusal_probe.analysis.claims import as_frame, compare, tally
from refusal_probe.analysis.tables import read_table
from refusal_probe.core.io import atomic_write

CLAIMS = {
    "method": "full fine-tuning and DPO lose far more refusal than LoRA/QLoRA at the same learning rate "
    "(adapter minus full-parameter final refusal; > 0 agrees)",
    "lr": "higher learning rates lose more refusal (lowest-lr minus highest-lr final refusal; > 0 agrees)",
    "early": "most of the loss happens in the first 25% of training (share of the base-to-final loss reached at the "
    "first checkpoint; > 0.5 agrees; runs whose loss is within noise are left out)",
}


def markdown(df, n: int) -> str:
    lines = [
        f"Refusal rates judged on n = {n} AdvBench prompts each; 95% intervals: Newcombe for a difference of two "
        "rates (conservative for paired prompts), a parametric bootstrap (2000 binomial redraws, seed 0) for a share.",
        "",
    ]
    counts = tally(list(df.itertuples(index=False)))
    for claim, text in CLAIMS.items():
        rows = df[df["claim"] == claim]
        c = counts.get(claim, {})
        summary = ", ".join(f"{v} {k}" for k, v in sorted(c.items())) or "no comparison possible"
        lines += [
            f"**{claim}**: {text}. Verdicts: {summary}.",
            "",
            "| comparison | estimate | 95% interval | verdict |",
        ]
        lines.append("|---|---|---|---|")
        for r in rows.itertuples(index=False):
            fmt = "{:.2f}" if claim == "early" else "{:+.0%}"
            lines.append(
                f"| {r.what} | {fmt.format(r.estimate)} | [{fmt.format(r.low)}, {fmt.format(r.high)}] | {r.verdict} |"
            )
        lines.append("")
    return "\n".join(lines)


COLOURS = {"agrees": "tab:green", "disagrees": "tab:red", "inconclusive": "tab:gray"}


def forest(df, out: Path) -> None:
    """One panel per claim: each comparison's estimate and 95% interval, coloured by verdict, the threshold dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    claims = [c for c in CLAIMS if (df["claim"] == c).any()]
    heights = [max(1.2, 0.35 * (df["claim"] == c).sum() + 0.6) for c in claims]
    fig, axes = plt.subplots(
        len(claims), 1, figsize=(8, sum(heights)), gridspec_kw={"height_ratios": heights}
    )
    for ax, claim in zip(list(getattr(axes, "flat", [axes])), claims, strict=True):
        rows = df[df["claim"] == claim].reset_index(drop=True)
        y = range(len(rows))[::-1]
        for yi, r in zip(y, rows.itertuples(index=False), strict=True):
            ax.plot([r.low, r.high], [yi, yi], color=COLOURS[r.verdict], lw=2)
            ax.plot(r.estimate, yi, "o", color=COLOURS[r.verdict])
        ax.axvline(0.5 if claim == "early" else 0.0, ls="--", color="black", lw=0.8)
        ax.set_yticks(list(y), list(rows["what"]), fontsize=7)
        ax.set_title(
            f"{claim}: "
            + (
                "share of the loss at the first checkpoint"
                if claim == "early"
                else "difference of final refusal rates"
            ),
            fontsize=9,
        )
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(out / f"claims.{ext}", dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("analysis", type=Path, help="an analysis folder (holds checkpoints.csv)")
    p.add_argument(
        "--n", type=int, required=True, help="AdvBench prompts per checkpoint behind each refusal rate"
    )
    p.add_argument("--out", type=Path, help="write claims.csv and claims.md here")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n {args.n}: pass the number of prompts each refusal rate was judged on")
    df = as_frame(compare(read_table(args.analysis, "checkpoints", required=True), args.n))
    text = markdown(df, args.n)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "claims.csv", lambda tmp: df.to_csv(tmp, index=False))
        atomic_write(args.out / "claims.md", lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
        forest(df, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
