"""The analysis report: findings first, then the study's figures, the tables, and last, folded away, provenance.

The report is built once as a list of blocks and rendered twice (``report.md``, ``report.html``), so the two never
disagree. The HTML is one self-contained file: each figure's PNG is embedded as a data URI, a
Content-Security-Policy meta tag forbids every request (``default-src 'none'; img-src data:``), and there is no
script, font or stylesheet from anywhere else. Every figure also lies beside the report as PNG and SVG. Paths are
shown relative to the tree (``<cache>/...``, ``~/...`` or ``.../name`` outside it), never as a path of the machine
that wrote them.

Inputs: summary.json (``summary``), the checkpoints and correlations tables, the figures analyze drew, and, read
from the output folder when present, behaviour.csv, drift.csv (per-layer correlations), method_contrast.csv and
prediction.json. Anything absent makes its section say it is not available.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refusal_probe.analysis import findings as fnd
from refusal_probe.analysis.correlate import CORRELATIONS_HOW, best_layer, strongest
from refusal_probe.analysis.paths import path_scrubber
from refusal_probe.analysis.tables import COLUMN_DOCS, read_table, summary_bases
from refusal_probe.analysis.uncertainty import rate_interval
from refusal_probe.core.io import write_text
from refusal_probe.evaluate.judge import LABELS as JUDGE_LABELS

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
FIGURE_DOCS: dict[str, tuple[str, str]] = {
    "figure1_refusal_vs_chrf": (
        "Figure 1: refusal rate vs chrF",
        "At one learning rate (the one most methods share), each run is a path from its base model (star) through "
        "its checkpoints in training order: down is refusal lost, right is translation gained. Bars: Wilson 95% "
        "intervals from the number of judged prompts.",
    ),
    "figure2_over_checkpoints": (
        "Figure 2: refusal and chrF over training",
        "Refusal rate (top) and chrF (bottom) against fraction of training, one column per learning rate, one line "
        "per run coloured by method. Bars: Wilson 95% intervals.",
    ),
    "drift_cos_to_base_by_layer": (
        "Direction drift by layer",
        "Cosine between each checkpoint's difference-of-means direction and the base model's, at every layer; "
        "one line per checkpoint coloured by fraction of training, base dashed, refusal layer dotted.",
    ),
    "drift_proj_gap_by_layer": (
        "Refusal signal by layer",
        "Harmful minus harmless mean projection on the base model's unit refusal direction, per layer.",
    ),
    "drift_probe_acc_by_layer": (
        "Linear separability by layer",
        "Held-out accuracy of a logistic-regression probe of harmful vs harmless activations, per layer.",
    ),
    "cos_heatmap": (
        "Direction drift over training (layer x step)",
        "cos_to_base per layer (rows) and checkpoint (columns), one panel per run; the refusal layer is boxed.",
    ),
    "delta_by_layer": (
        "Weight change by layer",
        "||W_ckpt - W_base||_F per layer: root-sum-square over all modules (solid), attention (dashed) and "
        "MLP (dotted) modules; one line per checkpoint.",
    ),
    "causal_drift": (
        "Causal drift",
        "Refusal-token log-odds with and without the base (or own) direction ablated on harmful prompts, and with "
        "the base direction added on harmless prompts, at the refusal layer, over training.",
    ),
    "lora_vs_full": (
        "LoRA vs full fine-tuning",
        "Where in depth the direction drifts, how large and concentrated the updates are, at matched learning rate "
        "and matched chrF.",
    ),
    "method_comparison": (
        "Full fine-tuning vs LoRA, per layer",
        "Final-checkpoint direction drift and weight change per layer, and behaviour during training, at matched "
        "learning rates where the sweep has them.",
    ),
    "behaviour": (
        "Behaviour",
        "Refusal rate and chrF against fraction of training; refusal rate against cos_to_base at the refusal layer "
        "(one point per checkpoint, base as a star).",
    ),
}
# report sections that show figures, in order: (title, figure stems, what to say when none was drawn)
SECTIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "Figure 1: refusal vs chrF",
        ("figure1_refusal_vs_chrf",),
        "needs refusal rates and chrF (`refusal-probe eval`)",
    ),
    (
        "Figure 2: over training",
        ("figure2_over_checkpoints",),
        "needs refusal rates and chrF (`refusal-probe eval`)",
    ),
    (
        "Direction drift by layer",
        ("drift_cos_to_base_by_layer", "drift_proj_gap_by_layer", "drift_probe_acc_by_layer"),
        "no drift was measured",
    ),
    ("Layer x step heatmap", ("cos_heatmap",), "no drift was measured"),
    (
        "Weight-delta profiles",
        ("delta_by_layer",),
        "no weight-delta figure (analyze draws it unless `--no-deltas`)",
    ),
    (
        "Causal drift",
        ("causal_drift", "drift_necessity_base_by_layer", "drift_sufficiency_base_by_layer"),
        "no causal measures were recorded",
    ),
    ("LoRA vs full fine-tuning", ("lora_vs_full", "method_comparison"), "the tree lacks full or LoRA runs"),
)
STUDY_FIGURES = ("figure1_refusal_vs_chrf", "figure2_over_checkpoints")  # drawn by the report itself
LABELS = tuple(f"label_{lab}" for lab in JUDGE_LABELS)  # the judge's labels, in its order

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


# ----------------------------------------------------------------------------------------------- paths


def _scrub_block(block: Block, scrub: Callable[[str], str]) -> Block:
    if block[0] == "img":  # file names relative to the report
        return block

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return scrub(v)
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, tuple):
            return tuple(walk(x) for x in v)
        return v

    return (block[0], *[walk(v) for v in block[1:]])


# ----------------------------------------------------------------------------------------------- content


def _findings(items: Sequence[fnd.Finding]) -> list[Block]:
    blocks: list[Block] = [("h", 2, "Findings")]
    blocks.append(
        (
            "p",
            "Computed from the tables beside this report; every number is stated with what it rests on. Intervals "
            "are 95%: Wilson for a refusal rate, Newcombe for a change of refusal rate, a bootstrap over runs for a "
            "correlation.",
        )
    )
    for f in items:
        blocks.append(("h", 3, f.title))
        blocks.append(("p", f.text))
        if f.items:
            blocks.append(("ul", list(f.items)))
    return blocks


def _figure_blocks(stem: str, files: Mapping[str, str], heading: bool = True) -> list[Block]:
    title, doc = FIGURE_DOCS.get(stem, (stem.replace("_", " "), ""))
    if stem.startswith("drift_") and stem not in FIGURE_DOCS:
        metric = stem[len("drift_") : -len("_by_layer")] if stem.endswith("_by_layer") else stem
        title, doc = f"{metric} by layer", f"Drift metric {metric} per layer, one line per checkpoint."
    blocks: list[Block] = [("h", 3, title)] if heading else []
    if doc:
        blocks.append(("p", doc))
    blocks.append(("img", title, files.get("png"), files.get("svg")))
    return blocks


def _figure_files(out_dir: Path, figures: Iterable[str | os.PathLike]) -> dict[str, dict[str, str]]:
    by_stem: dict[str, dict[str, str]] = {}
    for f in figures:
        f = Path(f)
        rel = Path(os.path.relpath(f, out_dir)).as_posix()
        by_stem.setdefault(f.stem, {})[f.suffix.lstrip(".").lower()] = rel
    return by_stem


def _correlations(corr: pd.DataFrame | None, per_layer: pd.DataFrame | None, k: int) -> list[Block]:
    blocks: list[Block] = [("h", 2, "Correlations with intervals")]
    if corr is None or not len(corr):
        return [
            *blocks,
            ("p", "Not available: no behaviour to correlate with (run `refusal-probe eval` on the tree)."),
        ]
    blocks.append(("p", CORRELATIONS_HOW))
    top = strongest(corr, k=k)
    order = [
        "x",
        "y",
        "group",
        "n",
        "n_runs",
        "spearman_rho",
        "spearman_ci_low",
        "spearman_ci_high",
        "pearson_r",
        "pearson_ci_low",
        "pearson_ci_high",
        "spearman_p",
        "pearson_p",
    ]
    if len(top):
        blocks.append(("h", 3, f"The {len(top)} strongest (by |Spearman rho|)"))
        blocks.append(_table(top.loc[:, [c for c in order if c in top.columns]], ("spearman_p", "pearson_p")))
    if "control" in corr.columns:
        part = corr[(corr["control"].fillna("").astype(str) != "") & (corr["group"] == "all")]
        if len(part):
            z = part["control"].iloc[0]
            blocks.append(
                ("h", 3, f"With {z} partialled out (does the metric say more than the update size?)")
            )
            cols = [c for c in (*order, "control") if c in part.columns and not c.endswith("_p")]
            blocks.append(_table(part.loc[:, cols]))
    if per_layer is not None and len(per_layer):
        blocks.append(("h", 3, "Which layer's drift tracks refusal"))
        best = best_layer(per_layer)
        if best:
            blocks.append(
                (
                    "p",
                    f"Across all runs, cos_to_base at layer {int(best['layer'])} tracks the refusal rate best: "
                    f"Spearman rho = {fmt(best['spearman_rho'])} (n = {int(best['n'])} checkpoints).",
                )
            )
        else:
            blocks.append(
                (
                    "p",
                    "No layer has a defined correlation: fewer than 3 checkpoints, or refusal rate or drift constant over them.",
                )
            )
        allg = per_layer[per_layer["group"] == "all"]
        cols = [c for c in ("layer", "chosen", *order[3:]) if c in allg.columns]
        blocks.append(_table(allg.loc[:, cols], ("spearman_p", "pearson_p")))
    return blocks


def _labels(table: pd.DataFrame | None, n: int | None) -> list[Block]:
    blocks: list[Block] = [("h", 2, "Behaviour: label breakdown")]
    if table is None or "refusal_rate" not in table.columns:
        return [*blocks, ("p", "Not available: no behaviour measurements (run `refusal-probe eval`).")]
    labels = [c for c in LABELS if c in table.columns]
    labels += sorted(c for c in table.columns if c.startswith("label_") and c not in labels)
    extra = [c for c in ("chrf", "xstest_refusal_rate") if c in table.columns]
    keys = [c for c in ("run", "checkpoint", "step") if c in table.columns]
    t = table.loc[:, [*keys, "refusal_rate", *labels, *extra]].copy()
    if n:
        ci = [rate_interval(r, n) for r in pd.to_numeric(t["refusal_rate"], errors="coerce")]
        t.insert(len(keys) + 1, "refusal_ci_low", [c[0] for c in ci])
        t.insert(len(keys) + 2, "refusal_ci_high", [c[1] for c in ci])
    blocks.append(
        (
            "p",
            "Share of judged responses per label at each checkpoint: refusal, echo (the prompt repeated), "
            "degenerate (empty or repetitive), comply; refusal_rate is the judge's refusal verdict"
            + (
                f", with a Wilson 95% interval from n = {n} prompts."
                if n
                else " (prompt count not recorded)."
            )
            + " Each label's definition is in the judge signature under Provenance.",
        )
    )
    blocks.append(_table(t))
    return blocks


def _checkpoints(table: pd.DataFrame | None) -> list[Block]:
    blocks: list[Block] = [("h", 2, "Every checkpoint")]
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
    blocks += [("details", "How each column was computed"), ("ul", defs), ("enddetails",)]
    return blocks


def _contrast(contrast: pd.DataFrame | None) -> list[Block]:
    if contrast is None or not len(contrast):
        return [("p", "`method_contrast.csv` is not present: the per-layer contrast table is not available.")]
    from refusal_probe.analysis.contrast import CONTRAST_DOCS

    defs = [f"{k}: {v}" for k, v in CONTRAST_DOCS.items()]
    return [
        ("h", 3, "method_contrast.csv"),
        _table(contrast),
        ("details", "How each column was computed"),
        ("ul", defs),
        ("enddetails",),
    ]


def versions() -> dict[str, str]:
    """Installed versions of the packages the numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("refusal-probe", "torch", "transformers", "peft", "pandas", "matplotlib", "sacrebleu"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _provenance(summary: Mapping, out_dir: Path) -> list[Block]:
    blocks: list[Block] = [
        ("details", "Provenance: model, data, judges, metric signatures, versions, commands")
    ]
    blocks.append(("h", 2, "Provenance"))
    blocks.append(
        (
            "p",
            "For every checkpoint the probe captured residual-stream activations (entering each decoder block) "
            "on harmful and harmless prompts, took the difference of their means as that checkpoint's refusal "
            "direction per layer, and compared it with the base model's direction at the same layer and position. "
            "Weight changes are Frobenius norms of W_checkpoint - W_base per weight matrix (LoRA: from the factors, "
            "never merged). Behaviour (refusal rate, chrF) comes from `refusal-probe eval` on the same checkpoints.",
        )
    )
    bases = summary_bases(summary)
    if bases:
        blocks.append(("h", 3, "Base model(s) and chosen refusal layer"))
        rows = []
        for spec, info in bases.items():
            rows.append(
                {"base": spec, **{k: v for k, v in info.items() if not isinstance(v, (Mapping, list))}}
            )
        blocks += _generic(rows)
        for spec, info in bases.items():
            sel = info.get("selection_settings")
            if isinstance(sel, Mapping) and sel:
                blocks.append(("p", f"How the direction of `{spec}` was selected:"))
                blocks.append(("code", json.dumps(sel, indent=2, default=str, sort_keys=True)))
    elif summary.get("model") or summary.get("base_model"):
        blocks.append(("p", f"Base model: `{summary.get('model') or summary.get('base_model')}`"))
    for key, title in (("runs", "Runs"), ("prompts", "Prompts (data)"), ("settings", "Settings")):
        if summary.get(key):
            blocks.append(("h", 3, title))
            blocks += _generic(summary[key])
    if summary.get("signatures"):
        blocks.append(("h", 3, "Judge and metric signatures"))
        blocks.append(("p", "Each behaviour number was computed exactly as its signature says."))
        blocks.append(("code", "\n".join(f"{k}: {v}" for k, v in summary["signatures"].items())))
    if isinstance(summary.get("how"), Mapping):
        blocks.append(("h", 3, "How each measure is defined"))
        blocks.append(("ul", [f"{k}: {v}" for k, v in summary["how"].items()]))
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
    if summary.get("notes"):
        blocks.append(("h", 3, "Notes"))
        blocks.append(("ul", [str(n) for n in summary["notes"]]))
    meta = summary.get("checkpoints") or summary.get("meta_source")
    if meta:
        blocks.append(("h", 3, "Checkpoints and where their metadata came from"))
        blocks += _generic(meta)
    from refusal_probe import __version__

    blocks.append(("h", 3, "Versions"))
    recorded = summary.get("versions")
    if isinstance(recorded, Mapping) and recorded:
        blocks.append(("p", "Recorded by the run that measured:"))
        blocks.append(("ul", _kv_items(recorded)))
    blocks.append(("p", "Of the program that wrote this report:"))
    blocks.append(("ul", _kv_items(versions() or {"refusal-probe": __version__})))
    blocks.append(("h", 3, "Commands"))
    cmds = []
    if isinstance(tree, Mapping) and tree.get("spec"):
        cmds.append(f"measured with: refusal-probe analyze {tree['spec']}  (settings as listed above)")
    if summary.get("command"):
        c = summary["command"]
        cmds.append(f"measured with: {' '.join(map(str, c)) if isinstance(c, list) else c}")
    cmds.append("regenerate this report (no model is loaded): refusal-probe report <this folder>")
    blocks.append(("code", "\n".join(cmds)))
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
        "refusal_layer",
        "position",
        "how",
        "notes",
        "versions",
        "command",
        "tables",
        "figures",
    }
    rest = {k: v for k, v in summary.items() if k not in known}
    if rest:
        blocks.append(("h", 3, "Other recorded fields"))
        blocks.append(("code", json.dumps(rest, indent=2, default=str, sort_keys=True)))
    blocks.append(("enddetails",))
    return blocks


def _refusal_layers(summary: Mapping, table: pd.DataFrame | None) -> list[str]:
    """One line per base: the chosen refusal layer and position, and how it was chosen."""
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
        items = [f"layer {int(v)}" for v in sorted({int(v) for v in table["refusal_layer"].dropna()})]
    return items


def build_blocks(
    out_dir: Path,
    summary: Mapping | None,
    checkpoint_table: pd.DataFrame | None,
    correlations: pd.DataFrame | None,
    figures: Iterable[str | os.PathLike],
    *,
    per_layer: pd.DataFrame | None = None,
    behaviour: pd.DataFrame | None = None,
    contrast: pd.DataFrame | None = None,
    prediction: Mapping | None = None,
    title: str = "refusal-probe analysis",
    top_k: int = 10,
    tables_at: str | None = None,
) -> list[Block]:
    """The report's blocks: findings, figures by section, tables, provenance (folded), with paths scrubbed."""
    from refusal_probe import __version__

    summary = summary or {}
    n = fnd.refusal_n(behaviour, summary.get("signatures"))
    blocks: list[Block] = [("h", 1, title)]
    blocks.append(
        (
            "p",
            f"Written by refusal-probe {__version__}. The tables "
            + (f"in `{tables_at}`" if tables_at else "beside this report")
            + " (CSV and Parquet) hold every number at full precision; this page rounds them. Each figure is "
            "beside it as PNG and SVG.",
        )
    )
    layers = _refusal_layers(summary, checkpoint_table)
    if layers:
        blocks.append(
            ("p", "Refusal direction (the base model's difference of means, *_at_rl columns read here):")
        )
        blocks.append(("ul", layers))
    found = fnd.all_findings(checkpoint_table, correlations, n=n, contrast=contrast, pred=prediction)
    blocks += _findings(found)
    files = _figure_files(out_dir, figures)
    shown: set[str] = set()
    for section, stems, missing in SECTIONS:
        blocks.append(("h", 2, section))
        have = [s for s in stems if s in files]
        if section == "Direction drift by layer":
            have += sorted(
                s
                for s in files
                if s.startswith("drift_")
                and s not in stems
                and s.endswith("_by_layer")
                and s not in {x for _, st, _ in SECTIONS for x in st}
            )
        if not have:
            blocks.append(("p", f"Not available: {missing}."))
        for stem in have:  # a figure's own heading only where it does not repeat the section's
            title = FIGURE_DOCS.get(stem, ("",))[0]
            blocks += _figure_blocks(stem, files[stem], heading=len(have) > 1 and title != section)
            shown.add(stem)
        if section == "LoRA vs full fine-tuning":
            blocks += _contrast(contrast)
    blocks += _correlations(correlations, per_layer, top_k)
    blocks += _labels(checkpoint_table, n)
    if "behaviour" in files:
        blocks += _figure_blocks("behaviour", files["behaviour"])
        shown.add("behaviour")
    blocks += _checkpoints(checkpoint_table)
    rest = [s for s in files if s not in shown]
    if rest:
        blocks.append(("h", 2, "Other figures"))
        for stem in rest:
            blocks += _figure_blocks(stem, files[stem])
    blocks += _provenance(summary, out_dir)
    scrub = path_scrubber(summary, out_dir)
    return [_scrub_block(b, scrub) for b in blocks]


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
        elif kind == "details":
            out.append(f"<details><summary>{html.escape(b[1])}</summary>")
        elif kind == "enddetails":
            out.append("</details>")
    return "\n\n".join(out) + "\n"


def _html_inline(text: str) -> str:
    """Escape, then turn `code` spans into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #eee; }
details { margin: 1em 0; } summary { cursor: pointer; font-weight: bold; }
.files { color: #666; font-size: 0.85em; }
"""


def _data_uri(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def to_html(
    blocks: Sequence[Block], title: str = "refusal-probe analysis", base_dir: Path | None = None
) -> str:
    """One self-contained page: PNGs (relative to ``base_dir``) embedded as data URIs, nothing fetched."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"/>',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}"/>',
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
            uri = _data_uri((base_dir or Path(".")) / png) if png else None
            if uri:
                out.append(f'<p><img src="{uri}" alt="{html.escape(alt)}"/></p>')
            else:
                out.append(f"<p>[figure {html.escape(alt)}: no PNG]</p>")
            names = " and ".join(f"<code>{html.escape(f)}</code>" for f in (png, svg) if f)
            out.append(f'<p class="files">Beside this report: {names}</p>')
        elif kind == "details":
            out.append(f"<details><summary>{html.escape(b[1])}</summary>")
        elif kind == "enddetails":
            out.append("</details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def read_optional_inputs(out_dir: Path) -> dict[str, Any]:
    """behaviour, contrast and prediction from an analysis folder, each None when its file is absent."""
    from refusal_probe.core.io import read_json

    got: dict[str, Any] = {"behaviour": read_table(out_dir, "behaviour")}
    got["contrast"] = read_table(out_dir, "method_contrast")
    got["prediction"] = None
    if (out_dir / "prediction.json").is_file():
        got["prediction"] = read_json(out_dir / "prediction.json")
    return got


def study_figures(
    out_dir: Path, summary: Mapping | None, table: pd.DataFrame | None, behaviour: pd.DataFrame | None
) -> list[Path]:
    """Figures 1 and 2, drawn from the checkpoint table into ``out_dir``; a stale copy is removed where the table
    no longer has what they need (no behaviour)."""
    from refusal_probe.analysis import plots

    n = fnd.refusal_n(behaviour, (summary or {}).get("signatures"))
    drawn = plots.figure1_refusal_vs_chrf(table, out_dir, n=n, summary=summary)
    drawn += plots.figure2_over_checkpoints(table, out_dir, n=n, summary=summary)
    for stem in STUDY_FIGURES:
        for ext in ("png", "svg"):
            old = out_dir / f"{stem}.{ext}"
            if old not in drawn and old.is_file():
                old.unlink()
    return drawn


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
    inputs_dir: str | Path | None = None,
) -> Path:
    """Write ``report.md``, ``report.html`` (same content) and Figures 1 and 2 into ``out_dir``; return the
    Markdown path. Any figure1/figure2 in ``figures`` is ignored: the report draws its own.

    behaviour.csv, method_contrast.csv and prediction.json are read from ``inputs_dir`` (default ``out_dir``)
    when they are there. Each file is written atomically."""
    out_dir = Path(out_dir)
    src = Path(inputs_dir) if inputs_dir else out_dir
    extra = read_optional_inputs(src)
    tables_at = None
    if src.resolve() != out_dir.resolve():  # the report is written away from its tables: say where they are
        tables_at = Path(os.path.relpath(str(src.resolve()), str(out_dir.resolve()))).as_posix()
    others = [f for f in figures if Path(f).stem not in STUDY_FIGURES]
    figures = [*study_figures(out_dir, summary, checkpoint_table, extra["behaviour"]), *others]
    blocks = build_blocks(
        out_dir,
        summary,
        checkpoint_table,
        correlations,
        figures,
        per_layer=per_layer,
        title=title,
        top_k=top_k,
        tables_at=tables_at,
        **extra,
    )
    md = write_text(out_dir / "report.md", to_markdown(blocks))
    write_text(out_dir / "report.html", to_html(blocks, title, out_dir))
    return md
