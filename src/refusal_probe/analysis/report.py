"""The analysis report: ``report.md`` and the same content as a standalone ``report.html``.

The report is built once as a list of blocks and rendered twice, so the two files never disagree. It says what
was measured and how (model, prompts, positions, judge and metric signatures), which refusal layer was chosen,
a per-checkpoint table with a definition of every column, the strongest correlations with n and p, and the figures
(PNG shown, SVG linked, both by path relative to the report).

Summary keys read (all optional; anything else is listed verbatim under "Other recorded fields"):
``bases`` ({spec: {refusal_layer, position, ...}} or a list of dicts with "spec"), ``runs`` ({run: {base, ...}}),
``prompts`` ({name: {source, n}}), ``settings`` (flat dict), ``signatures`` ({name: signature string}),
``checkpoints`` / ``meta_source`` (where each checkpoint's metadata came from), ``model``, ``refusal_layer``,
``position``.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refusal_probe.analysis.correlate import EXACT_MAX_N, MIN_POINTS, best_layer, strongest
from refusal_probe.analysis.tables import COLUMN_DOCS, summary_bases
from refusal_probe.core.io import write_text

FIGURE_DOCS: dict[str, tuple[str, str]] = {
    "drift_cos_to_base_by_layer": (
        "Direction drift by layer",
        "Cosine between each checkpoint's difference-of-means direction and the base model's, at every layer; "
        "one line per checkpoint coloured by fraction of training, base dashed, refusal layer dotted.",
    ),
    "cos_heatmap": (
        "Direction drift over training",
        "cos_to_base per layer (rows) and checkpoint (columns), one panel per run; the refusal layer is boxed.",
    ),
    "delta_by_layer": (
        "Weight change by layer",
        "||W_ckpt - W_base||_F per layer: root-sum-square over all modules (solid), attention (dashed) and "
        "MLP (dotted) modules; one line per checkpoint.",
    ),
    "method_comparison": (
        "Full fine-tuning vs LoRA",
        "Final-checkpoint direction drift and weight change per layer, and behaviour during training, at matched "
        "learning rates where the sweep has them.",
    ),
    "behaviour": (
        "Behaviour",
        "Refusal rate and chrF against fraction of training; refusal rate against cos_to_base at the refusal layer "
        "(one point per checkpoint, base as a star).",
    ),
}
CORRELATION_DOC = (
    "Each checkpoint is one point; the base model (step 0 of every run) is counted once per distinct base. "
    "Spearman rho is the rank correlation, Pearson r the linear one (scipy.stats.spearmanr / pearsonr), both over "
    "the checkpoints where both values are finite. p is two-sided and uncorrected for the {m} tests in this table: "
    "Pearson p from scipy's t-test, Spearman p exact over all n! pairings when n <= {exact} (scipy's t "
    "approximation beyond). "
    "Checkpoints of one run are not independent samples, so read p as a guide, not a test. Groups: 'all' = every "
    "run; a method name = that method's runs (reported when it has >= {k} points)."
)

Block = tuple


# ----------------------------------------------------------------------------------------------- formatting


def fmt(value: Any, *, p: bool = False) -> str:
    """A number as it appears in the report: 4 significant digits, p-values in 2, missing as 'n/a'."""
    if value is None or value is pd.NA:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "n/a"
        if p:
            return f"{v:.2g}"
        if v.is_integer() and abs(v) < 1e6:
            return str(int(v))
        return f"{v:.4g}"
    return str(value)


def _table(df: pd.DataFrame, p_cols: Iterable[str] = ()) -> Block:
    p_cols = set(p_cols)
    rows = [
        [fmt(v, p=c in p_cols) for c, v in zip(df.columns, row, strict=True)] for row in df.itertuples(False)
    ]
    return ("table", [str(c) for c in df.columns], rows)


def _kv_items(d: Mapping) -> list[str]:
    return [f"{k}: {_inline(v)}" for k, v in d.items()]


def _inline(v: Any) -> str:
    if isinstance(v, Mapping):
        return "; ".join(f"{k}={_inline(x)}" for k, x in v.items()) or "{}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_inline(x) for x in v) or "[]"
    return fmt(v) if isinstance(v, (int, float)) else str(v)


def _generic(obj: Any) -> list[Block]:
    """Any JSON-like value as blocks: a list of dicts becomes a table, a dict a bullet list."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, Mapping) for v in obj.values()):
            keys = sorted({k for v in obj.values() for k in v})
            rows = [[str(name)] + [_inline(v.get(k, "")) for k in keys] for name, v in obj.items()]
            return [("table", ["", *keys], rows)]
        return [("ul", _kv_items(obj))]
    if isinstance(obj, (list, tuple)):
        if obj and all(isinstance(v, Mapping) for v in obj):
            keys = list(dict.fromkeys(k for v in obj for k in v))
            return [("table", keys, [[_inline(v.get(k, "")) for k in keys] for v in obj])]
        return [("p", _inline(obj))]
    return [("p", str(obj))]


# ----------------------------------------------------------------------------------------------- content


def _measured(summary: Mapping) -> list[Block]:
    blocks: list[Block] = [("h", 2, "What was measured and how")]
    blocks.append(
        (
            "p",
            "For every checkpoint the probe captured residual-stream activations (entering each decoder block) "
            "on harmful and harmless prompts, took the difference of their means as that checkpoint's refusal "
            "direction per layer, and compared it with the base model's direction at the same layer and position "
            "(cosine, norm ratio, projections on the base model's chosen unit refusal direction). Weight changes "
            "are Frobenius norms of W_checkpoint - W_base per weight matrix (LoRA: from the factors, never merged). "
            "Behaviour (refusal rate, chrF) comes from `refusal-probe eval` on the same checkpoints.",
        )
    )
    bases = summary_bases(summary)
    if bases:
        blocks.append(("h", 3, "Base model(s)"))
        blocks += _generic(bases)
    elif summary.get("model") or summary.get("base_model"):
        blocks.append(("p", f"Base model: `{summary.get('model') or summary.get('base_model')}`"))
    if summary.get("runs"):
        blocks.append(("h", 3, "Runs"))
        blocks += _generic(summary["runs"])
    if summary.get("prompts"):
        blocks.append(("h", 3, "Prompts"))
        blocks += _generic(summary["prompts"])
    if summary.get("settings"):
        blocks.append(("h", 3, "Settings"))
        blocks += _generic(summary["settings"])
    if summary.get("signatures"):
        blocks.append(("h", 3, "Judge and metric signatures"))
        blocks.append(("p", "Each score below was computed exactly as its signature says."))
        blocks.append(("code", "\n".join(f"{k}: {v}" for k, v in summary["signatures"].items())))
    tree = summary.get("tree")
    if isinstance(tree, Mapping):
        blocks.append(("h", 3, "Checkpoint tree"))
        if tree.get("spec"):
            blocks.append(("p", f"Tree: `{tree['spec']}`"))
        if tree.get("notes"):
            blocks.append(("ul", [str(n) for n in tree["notes"]]))
        skipped = tree.get("skipped") or []
        if skipped:
            blocks.append(("p", f"{len(skipped)} folder(s) could not be read as runs and were skipped:"))
            blocks += _generic(list(skipped))
    meta = summary.get("checkpoints") or summary.get("meta_source")
    if meta:
        blocks.append(("h", 3, "Where each checkpoint's metadata came from"))
        blocks += _generic(meta)
    known = {
        "tree",
        "bases",
        "runs",
        "prompts",
        "settings",
        "signatures",
        "checkpoints",
        "meta_source",
        "model",
        "base_model",
    }
    known |= {"refusal_layer", "position"}
    rest = {k: v for k, v in summary.items() if k not in known}
    if rest:
        blocks.append(("h", 3, "Other recorded fields"))
        blocks.append(("code", json.dumps(rest, indent=2, default=str, sort_keys=True)))
    return blocks


def _refusal_layer(summary: Mapping, table: pd.DataFrame | None) -> list[Block]:
    blocks: list[Block] = [("h", 2, "Chosen refusal layer")]
    items = []
    for spec, info in summary_bases(summary).items():
        if info.get("refusal_layer") is None:
            continue
        text = f"`{spec}`: layer {info['refusal_layer']}"
        if info.get("position") is not None:
            text += f", position {info['position']}"
        how = info.get("selection") or info.get("how") or info.get("selected_by")
        if how:
            text += f" (chosen by {_inline(how)})"
        items.append(text)
    if not items and summary.get("refusal_layer") is not None:
        pos = f", position {summary['position']}" if summary.get("position") is not None else ""
        items.append(f"layer {summary['refusal_layer']}{pos}")
    if not items and table is not None and "refusal_layer" in table.columns:
        layers = sorted({int(v) for v in table["refusal_layer"].dropna()})
        items = [f"layer {v}" for v in layers]
    if items:
        blocks.append(
            (
                "p",
                "The base model's difference-of-means direction at this layer is the refusal direction "
                "that projections (proj_*) and delta_along_refusal are measured against; *_at_rl columns "
                "are read at this layer.",
            )
        )
        blocks.append(("ul", items))
    else:
        blocks.append(("p", "No refusal layer was recorded; the *_at_rl columns are empty."))
    return blocks


def _checkpoints(table: pd.DataFrame | None) -> list[Block]:
    blocks: list[Block] = [("h", 2, "Per-checkpoint measurements")]
    if table is None or not len(table):
        return [*blocks, ("p", "No checkpoints were measured.")]
    blocks.append(
        (
            "p",
            f"{len(table)} rows, one per checkpoint (run, checkpoint name); the base model is step 0 of each run.",
        )
    )
    blocks.append(_table(table))
    defs = [
        f"{c}: {COLUMN_DOCS.get(c, 'as reported by refusal-probe eval (see signatures)')}"
        for c in table.columns
    ]
    blocks += [("h", 3, "How each column was computed"), ("ul", defs)]
    return blocks


def _correlations(correlations: pd.DataFrame | None, per_layer: pd.DataFrame | None, k: int) -> list[Block]:
    blocks: list[Block] = [("h", 2, "Strongest correlations with behaviour")]
    if correlations is None or not len(correlations):
        return [
            *blocks,
            ("p", "No behaviour measurements to correlate with: run `refusal-probe eval` on the tree."),
        ]
    top = strongest(correlations, k=k)
    blocks.append(("p", CORRELATION_DOC.format(m=len(correlations), k=MIN_POINTS, exact=EXACT_MAX_N)))
    if not len(top):
        blocks.append(("p", f"No pair had >= {MIN_POINTS} checkpoints with finite, non-constant values."))
    else:
        cols = ["x", "y", "group", "n", "spearman_rho", "spearman_p", "pearson_r", "pearson_p"]
        blocks.append(_table(top.loc[:, cols], p_cols=("spearman_p", "pearson_p")))
    if per_layer is not None and len(per_layer):
        best = best_layer(per_layer)
        blocks.append(("h", 3, "Which layer's drift tracks refusal"))
        if best:
            blocks.append(
                (
                    "p",
                    f"Across all runs, cos_to_base at layer {int(best['layer'])} tracks the refusal rate best: "
                    f"Spearman rho = {fmt(best['spearman_rho'])} (p = {fmt(best['spearman_p'], p=True)}, "
                    f"n = {int(best['n'])} checkpoints). Per layer, same method as above:",
                )
            )
        allg = per_layer[per_layer["group"] == "all"]
        cols = ["layer", "n", "spearman_rho", "spearman_p", "pearson_r", "pearson_p"]
        blocks.append(_table(allg.loc[:, cols], p_cols=("spearman_p", "pearson_p")))
    return blocks


def _figures(out_dir: Path, figures: Iterable[str | os.PathLike]) -> list[Block]:
    blocks: list[Block] = [("h", 2, "Figures")]
    by_stem: dict[str, dict[str, str]] = {}
    for f in figures:
        f = Path(f)
        rel = Path(os.path.relpath(f, out_dir)).as_posix()
        by_stem.setdefault(f.stem, {})[f.suffix.lstrip(".").lower()] = rel
    if not by_stem:
        return [*blocks, ("p", "No figures were drawn.")]
    for stem, files in by_stem.items():
        title, doc = FIGURE_DOCS.get(stem, (stem.replace("_", " "), ""))
        if stem.startswith("drift_") and stem not in FIGURE_DOCS:
            metric = stem[len("drift_") : -len("_by_layer")] if stem.endswith("_by_layer") else stem
            title, doc = f"{metric} by layer", f"Drift metric {metric} per layer, one line per checkpoint."
        blocks.append(("h", 3, title))
        if doc:
            blocks.append(("p", doc))
        blocks.append(("img", title, files.get("png"), files.get("svg")))
    return blocks


def build_blocks(
    out_dir: Path,
    summary: Mapping | None,
    checkpoint_table: pd.DataFrame | None,
    correlations: pd.DataFrame | None,
    figures: Iterable[str | os.PathLike],
    *,
    per_layer: pd.DataFrame | None = None,
    title: str = "refusal-probe analysis",
    top_k: int = 10,
) -> list[Block]:
    from refusal_probe import __version__

    summary = summary or {}
    blocks: list[Block] = [("h", 1, title)]
    blocks.append(
        (
            "p",
            f"Written by refusal-probe {__version__}. Tables next to this report hold every number "
            "at full precision; this page rounds to 4 significant digits.",
        )
    )
    blocks += _measured(summary)
    blocks += _refusal_layer(summary, checkpoint_table)
    blocks += _checkpoints(checkpoint_table)
    blocks += _correlations(correlations, per_layer, top_k)
    blocks += _figures(out_dir, figures)
    return blocks


# ----------------------------------------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2])
        elif kind == "p":
            out.append(b[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in b[1]))
        elif kind == "code":
            out.append("```\n" + b[1] + "\n```")
        elif kind == "table":
            header, rows = b[1], b[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            _, alt, png, svg = b
            parts = []
            if png:
                parts.append(f"![{alt}]({png})")
            if svg:
                parts.append(f"[SVG]({svg})")
            out.append("\n\n".join(parts))
    return "\n\n".join(out) + "\n"


def _html_inline(text: str) -> str:
    """Escape, then turn `code` spans into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def to_html(blocks: Sequence[Block], title: str = "refusal-probe analysis") -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"/>',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{_html_inline(b[2])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{_html_inline(b[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "code":
            out.append(f"<pre>{html.escape(b[1])}</pre>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b[2]
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            _, alt, png, svg = b
            if png:
                out.append(f'<p><img src="{html.escape(png)}" alt="{html.escape(alt)}"/></p>')
            if svg:
                out.append(f'<p><a href="{html.escape(svg)}">SVG</a></p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(
    out_dir: str | Path,
    summary: Mapping | None,
    checkpoint_table: pd.DataFrame | None,
    correlations: pd.DataFrame | None,
    figures: Iterable[str | os.PathLike],
    *,
    per_layer: pd.DataFrame | None = None,
    title: str = "refusal-probe analysis",
    top_k: int = 10,
) -> Path:
    """Write ``report.md`` and ``report.html`` (same content) into ``out_dir``; return the Markdown path."""
    out_dir = Path(out_dir)
    blocks = build_blocks(
        out_dir,
        summary,
        checkpoint_table,
        correlations,
        list(figures),
        per_layer=per_layer,
        title=title,
        top_k=top_k,
    )
    md = write_text(out_dir / "report.md", to_markdown(blocks))
    write_text(out_dir / "report.html", to_html(blocks, title))
    return md
