"""Issue 9's comparison table: plain full fine-tuning against each safety-preserving option at equal steps.

    python experiments/safety_table.py runs/safety-options [--csv experiments/results/safety-options/options.csv]
    python experiments/safety_table.py experiments/results/safety-options --analysis analysis analysis-part2

Reads what the toolkit wrote: ``<analysis>/checkpoints.csv`` (drift, causal measures, weight change, behaviour;
several analysis folders are joined, the first one's row kept where a checkpoint is in more than one),
``eval/<run>/<checkpoint>/advbench.jsonl`` (every prompt's verdict) and ``<run>/run.json`` or ``runs/<run>/run.json``
(the option's own record and wall time). Every option run is compared with the plain run's final checkpoint on the same AdvBench prompts:
the refusal rate with its Wilson 95% interval, the paired difference option - plain with a 95% percentile interval
from 2000 bootstrap resamples of the prompts (seed 0), and McNemar's exact two-sided p on the discordant prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from refusal_probe.analysis.findings import wilson

N_BOOT = 2000
SEED = 0
PLAIN = "plain"
COLUMNS = (
    ("option", "option", "{}"),
    ("step", "step", "{:d}"),
    ("refusal", "refusal [95% CI]", "{}"),
    ("diff", "vs plain [95% CI], McNemar p", "{}"),
    ("label_echo", "echo", "{:.0%}"),
    ("label_degenerate", "degen.", "{:.0%}"),
    ("label_comply", "comply", "{:.0%}"),
    ("chrf", "chrF", "{:.1f}"),
    ("cos", "cos to base dir [95% CI]", "{}"),
    ("proj_gap_at_rl", "proj gap", "{:.2f}"),
    ("necessity_base", "necessity (base dir)", "{}"),
    ("necessity_own", "necessity (own dir)", "{}"),
    ("sufficiency_base", "sufficiency", "{}"),
    ("causal_reading", "reading", "{}"),
    ("delta_fro_total", "‖ΔW‖F", "{:.3f}"),
    ("train_s", "train s", "{:.0f}"),
    ("record", "the option's own record (run.json)", "{}"),
)


def verdicts(eval_dir: Path, run: str, checkpoint: str) -> pd.Series | None:
    """Prompt index -> refused (bool) from one checkpoint's advbench.jsonl; the base sits under eval/_base/."""
    path = eval_dir / run / checkpoint / "advbench.jsonl"
    if checkpoint == "base":
        found = sorted((eval_dir / "_base").glob("*/advbench.jsonl"))
        path = found[0] if len(found) == 1 else path
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return pd.Series({int(r["i"]): bool(r["refusal"]) for r in rows})


def paired_difference(a: pd.Series, b: pd.Series) -> tuple[float, float, float, float]:
    """b - a refusal rate over the shared prompts: the difference, its bootstrap 95% interval, McNemar's exact p."""
    shared = a.index.intersection(b.index)
    x, y = a[shared].to_numpy(float), b[shared].to_numpy(float)
    rng = np.random.default_rng(SEED)
    idx = rng.integers(0, len(shared), size=(N_BOOT, len(shared)))
    boot = (y[idx] - x[idx]).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    gained, lost = int(((y == 1) & (x == 0)).sum()), int(((y == 0) & (x == 1)).sum())
    p = stats.binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    return float(y.mean() - x.mean()), float(lo), float(hi), float(p)


def option_record(run_json: dict) -> str:
    """What the option itself recorded while training (run.json "safety"), scalars only, one clause per option."""
    skip = {"refusal_direction", "safety_batch", "seconds_per_step"}
    parts = []
    for name, entry in (run_json.get("safety") or {}).items():
        if name in skip or not isinstance(entry, dict):
            continue
        fields = []
        for k, v in entry.items():
            if isinstance(v, float):
                fields.append(f"{k}={v:.4g}")
            elif isinstance(v, (int, str)) and len(str(v)) <= 40:
                fields.append(f"{k}={v}")
            elif isinstance(v, list) and len(v) <= 8 and all(isinstance(x, (int, float)) for x in v):
                fields.append(f"{k}={v}")
        parts.append(f"{name}: " + ", ".join(fields))
    return "; ".join(parts)


def build(root: Path, analyses: tuple[str, ...] = ("analysis",)) -> pd.DataFrame:
    parts = [
        pd.read_csv(root / a / "checkpoints.csv", dtype={"run": str, "checkpoint": str}) for a in analyses
    ]
    table = pd.concat(parts, ignore_index=True).drop_duplicates(["run", "checkpoint"], keep="first")
    eval_dir = root / "eval"
    base_rows = table[table["step"] == 0].head(1).assign(run="base", checkpoint="base")
    runs = table[table["step"] != 0]
    runs = (
        runs.assign(_order=(runs["run"] != PLAIN))
        .sort_values(["_order", "run", "step"])
        .drop(columns="_order")
    )
    rows = pd.concat([base_rows, runs], ignore_index=True)  # base, plain, then the options by name
    plain_final = table[(table["run"] == PLAIN)].sort_values("step").tail(1)
    plain_v = verdicts(eval_dir, PLAIN, str(plain_final["checkpoint"].iloc[0])) if len(plain_final) else None
    out = []
    for _, r in rows.iterrows():
        v = verdicts(eval_dir, r["run"], r["checkpoint"])
        rec: dict = {"option": r["run"], "step": int(r["step"]), **r.to_dict()}
        if v is not None:
            k, n = int(v.sum()), len(v)
            lo, hi = wilson(k, n)
            rec["refusal"] = f"{k / n:.0%} [{lo:.0%}, {hi:.0%}] (n={n})"
            if plain_v is not None and r["run"] not in (PLAIN, "base"):
                d, dlo, dhi, p = paired_difference(plain_v, v)
                rec["diff"] = f"{d:+.0%} [{dlo:+.0%}, {dhi:+.0%}], p={p:.2g}"
        if {"cos_to_base_at_rl", "cos_to_base_ci_low_at_rl"} <= set(r.index):
            rec["cos"] = (
                f"{r['cos_to_base_at_rl']:.3f} [{r['cos_to_base_ci_low_at_rl']:.3f}, {r['cos_to_base_ci_high_at_rl']:.3f}]"
            )
        for m in ("necessity_base", "necessity_own", "sufficiency_base"):
            v, lo, hi = (r.get(f"{m}{end}_at_rl") for end in ("", "_ci_low", "_ci_high"))
            if v is not None and pd.notna(v):
                ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and pd.notna(lo) and pd.notna(hi) else ""
                rec[m] = f"{v:.2f}{ci}"
        found = [
            p for p in (root / str(r["run"]), root / "runs" / str(r["run"])) if (p / "run.json").is_file()
        ]
        if found:
            run_json = found[0] / "run.json"
            doc = json.loads(run_json.read_text(encoding="utf-8"))
            rec["train_s"] = doc.get("wall_time_s")
            rec["record"] = option_record(doc)
        out.append(rec)
    return pd.DataFrame(out)


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return fmt.format(int(value) if fmt == "{:d}" else value)


def markdown(df: pd.DataFrame) -> str:
    cols = [c for c in COLUMNS if c[0] in df.columns]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_cell(row.get(c), f) for c, _, f in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "root", type=Path, help="the experiment's runs folder (holds analysis/, eval/ and the runs)"
    )
    p.add_argument("--csv", type=Path, help="also write the table as CSV here")
    p.add_argument(
        "--analysis",
        nargs="+",
        default=["analysis"],
        help="analysis folders under ROOT to join (default: analysis)",
    )
    args = p.parse_args(argv)
    df = build(args.root, tuple(args.analysis))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.csv, index=False)
    print(markdown(df))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
