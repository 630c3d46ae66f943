"""Print a sweep's per-checkpoint results as a Markdown table (the one in README.md and experiments/results/).

    python experiments/table.py runs/cpu-small/analysis/checkpoints.csv

Reads the wide table `refusal-probe analyze` writes (one row per checkpoint, behaviour joined from
`refusal-probe eval`). The base appears once, as step 0.
"""

from __future__ import annotations

import sys

import pandas as pd

COLUMNS = (
    ("method", "method", "{}"),
    ("lr", "lr", "{:g}"),
    ("step", "step", "{:d}"),
    ("refusal_rate", "refusal", "{:.0%}"),
    ("label_echo", "echo", "{:.0%}"),
    ("label_degenerate", "degenerate", "{:.0%}"),
    ("label_comply", "comply", "{:.0%}"),
    ("chrf", "chrF", "{:.1f}"),
    ("cos_to_base_at_rl", "cos to base dir", "{:.3f}"),
    ("proj_gap_at_rl", "proj gap", "{:.2f}"),
    ("delta_fro_total", "‖ΔW‖F", "{:.2f}"),
)
METHOD_ORDER = {"base": 0, "full": 1, "lora": 2, "qlora": 3, "dpo": 4}


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return fmt.format(int(value) if fmt == "{:d}" else value)


def markdown(table: pd.DataFrame) -> str:
    df = table.copy()
    base = df[df["step"] == 0].head(1).assign(method="base", lr=float("nan"))
    df = pd.concat([base, df[df["step"] != 0]], ignore_index=True)
    df["_m"] = df["method"].map(METHOD_ORDER).fillna(9)
    df = df.sort_values(["_m", "lr", "step"], ascending=[True, False, True], kind="stable")
    cols = [c for c in COLUMNS if c[0] in df.columns]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_cell(row[c], f) for c, _, f in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python experiments/table.py ANALYSIS/checkpoints.csv")
    print(markdown(pd.read_csv(sys.argv[1])))
