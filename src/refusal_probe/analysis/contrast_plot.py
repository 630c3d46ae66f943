"""The LoRA-vs-full figure (lora_vs_full.png/.svg): the numbers of ``contrast.method_contrast`` drawn per layer.

Panels: cos_to_base by layer and update size by layer for the matched-lr final checkpoints, the fraction of each
layer's residual-writing update along the refusal direction against chance, where the update energy sits by
module kind, refusal against chrF with each matched-chrF pair joined by a line, drift at the refusal layer against
update size with matched-update pairs (within 2x) joined, and the causal measures at the refusal layer when present.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from refusal_probe.analysis import plots
from refusal_probe.analysis.contrast import MODULE_KINDS, contrast_layers

# causal columns (helper CAUSAL's drift metrics at the refusal layer) drawn when present
CAUSAL_COLUMNS = ("necessity_base_at_rl", "necessity_own_at_rl", "sufficiency_base_at_rl")
# 1 - cos below this is drawn at it (log axis; LoRA at a low lr stays within 1e-5 of the base)
DRIFT_FLOOR = 1e-6


def plot_lora_vs_full(
    contrast: pd.DataFrame,
    drift: pd.DataFrame | None,
    deltas: pd.DataFrame | None,
    out_dir: str | Path,
    *,
    summary: Mapping | None = None,
) -> list[Path]:
    """[] when the contrast table is empty (no full run, or nothing to pair with it)."""
    if contrast is None or not len(contrast):
        return []
    lr_pairs = contrast[contrast["pairing"] == "matched_lr"]
    curves = contrast_layers(contrast, drift, deltas)
    styles = plots._run_styles(lr_pairs) if len(lr_pairs) else {}
    panels = [m for m in ("cos_to_base", "delta_fro_layer", "along_layer") if m in set(curves["metric"])]
    shares = [f"share_{k}" for k in MODULE_KINDS if f"share_{k}" in contrast.columns]
    if shares and len(lr_pairs):
        panels.append("modules")
    if {"refusal_rate", "chrf"} <= set(contrast.columns):
        panels.append("behaviour")
    if {"cos_to_base_at_rl", "delta_fro_total"} <= set(contrast.columns):
        panels.append("size")
    causal = [c for c in CAUSAL_COLUMNS if c in lr_pairs.columns and lr_pairs[c].notna().any()]
    if causal:
        panels.append("causal")
    if not panels:
        return []
    chance = contrast["along_chance"].dropna()
    layers = (
        sorted({int(v) for v in contrast["refusal_layer"].dropna()}) if "refusal_layer" in contrast else []
    )
    with matplotlib.rc_context(plots.RC):
        fig = plots._figure(len(panels), max_cols=3, panel=(4.6, 3.4))
        axes = plots._grid(fig, len(panels), sharey=False, max_cols=3)
        for ax, panel in zip(axes, panels, strict=True):
            if panel in ("cos_to_base", "delta_fro_layer", "along_layer"):
                c = curves[curves["metric"] == panel]
                for run, g in c.groupby("run", sort=True):
                    g = g.sort_values("layer")
                    ax.plot(g["layer"], g["value"], markersize=3, **styles[run])
                for layer in layers:
                    plots._mark_layer(ax, layer)
                ax.set_xlabel("layer")
            if panel == "cos_to_base":
                ax.set(ylabel=plots.METRIC_LABELS["cos_to_base"], title="Direction drift (final, matched lr)")
                ax.legend(fontsize=6.5, loc="best")
            elif panel == "delta_fro_layer":
                ax.set_yscale("log")
                ax.set(ylabel="||dW_l||_F, all modules (log)", title="Update size per layer")
            elif panel == "along_layer":
                if len(chance):
                    line = ax.axhline(float(chance.iloc[0]), color="0.2", linestyle="--")
                    ax.legend([line], ["chance 1/sqrt(d_model)"], fontsize=7, loc="best")
                ax.set(
                    ylabel="||r^T dW|| / ||dW||_F (o_proj + down_proj)",
                    title="Update along the refusal direction",
                )
            elif panel == "modules":
                _module_bars(ax, lr_pairs, shares, styles)
            elif panel == "behaviour":
                _behaviour_pairs(ax, contrast)
            elif panel == "size":
                _size_pairs(ax, contrast)
            elif panel == "causal":
                _causal_bars(ax, lr_pairs, causal)
            ax.grid(alpha=0.3, which="both")
        plots._finish(fig, "Why did LoRA keep its refusals? Full fine-tuning vs LoRA/QLoRA/DPO", summary)
        return plots._save(fig, out_dir, "lora_vs_full")


def _module_bars(ax, lr_pairs: pd.DataFrame, shares: list[str], styles: Mapping) -> None:
    """Stacked share of update energy per module kind, one bar per matched-lr checkpoint."""
    rows = lr_pairs.drop_duplicates("run").sort_values(["lr", "method", "run"])
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    cmap = matplotlib.colormaps["tab10"]
    for i, col in enumerate(shares):
        vals = rows[col].fillna(0.0).to_numpy(dtype=float)
        ax.bar(x, vals, bottom=bottom, color=cmap(i), label=col.removeprefix("share_"), width=0.75)
        bottom += vals
    ax.set_xticks(x)
    ax.set_xticklabels([f"{m}\n{lr:g}" for m, lr in zip(rows["method"], rows["lr"], strict=True)], fontsize=7)
    ax.set(ylabel="share of ||dW||_F^2", ylim=(0, 1.02), title="Where the update sits, by module kind")
    ax.legend(fontsize=6.5, ncol=2, loc="upper right")


def _causal_bars(ax, lr_pairs: pd.DataFrame, cols: list[str]) -> None:
    """Causal measures at the refusal layer (helper columns ``*_at_rl``), grouped bars per matched-lr checkpoint."""
    rows = lr_pairs.drop_duplicates("run").sort_values(["lr", "method", "run"])
    x = np.arange(len(rows))
    width = 0.8 / len(cols)
    for i, col in enumerate(cols):
        vals = rows[col].astype(float).to_numpy()
        ax.bar(x + (i - (len(cols) - 1) / 2) * width, vals, width=width, label=col.removesuffix("_at_rl"))
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{m}\n{lr:g}" for m, lr in zip(rows["method"], rows["lr"], strict=True)], fontsize=7)
    ax.set(ylabel="refusal log-odds change", title="Causal role of the base direction (refusal layer)")
    ax.legend(fontsize=6.5, loc="best")


def _method_points(ax, pts: pd.DataFrame, x, y) -> None:
    """One point per checkpoint at (x(g), y(g)), coloured by method (one legend entry per method)."""
    for method, g in pts.groupby(pts["method"].fillna("unknown"), sort=True):
        ax.scatter(
            x(g),
            y(g),
            s=22,
            color=plots.METHOD_COLORS.get(method, plots.UNKNOWN_COLOR),
            label=method,
            edgecolor="white",
            linewidth=0.5,
            zorder=3,
        )


def _size_pairs(ax, contrast: pd.DataFrame) -> None:
    """Drift at the refusal layer against total update size; matched-update pairs within 2x joined by a grey line."""

    def drift(g: pd.DataFrame) -> pd.Series:
        return (1.0 - g["cos_to_base_at_rl"].astype(float)).clip(lower=DRIFT_FLOOR)

    pts = contrast.drop_duplicates(["run", "step"])
    pts = pts[pd.to_numeric(pts["delta_fro_total"], errors="coerce") > 0]
    _method_points(ax, pts, lambda g: g["delta_fro_total"], drift)
    pairs = contrast[contrast["pairing"] == "matched_update"]
    if "update_ratio" in pairs:
        ratio = pairs["update_ratio"].astype(float)
        pairs = pairs[(ratio <= 2.0) & (ratio >= 0.5)]
    for _, g in pairs.groupby("pair", sort=True):
        ax.plot(g["delta_fro_total"], drift(g), color="0.6", linewidth=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(
        xlabel="||W_ckpt - W_base||_F (log)",
        ylabel=f"1 - cos to base direction at refusal layer (log, floor {DRIFT_FLOOR:g})",
        title="Drift for the same update size (lines: pairs within 2x)",
    )
    ax.legend(fontsize=7, title="method", title_fontsize=7)


def _behaviour_pairs(ax, contrast: pd.DataFrame) -> None:
    """Refusal against chrF per checkpoint; each matched-chrF pair joined by a grey line."""
    pts = contrast.drop_duplicates(["run", "step"])
    _method_points(ax, pts, lambda g: g["chrf"], lambda g: g["refusal_rate"])
    chrf_pairs = contrast[contrast["pairing"] == "matched_chrf"]
    for _, g in chrf_pairs.groupby("pair", sort=True):
        ax.plot(g["chrf"], g["refusal_rate"], color="0.6", linewidth=0.7, zorder=1)
    ax.set(
        xlabel="chrF",
        ylabel=plots.METRIC_LABELS["refusal_rate"],
        title="Refusal vs chrF (lines: matched-chrF pairs)",
    )
    ax.legend(fontsize=7, title="method", title_fontsize=7)


def write_from_tables(folder: str | Path, d_model: int | None = None) -> list[Path]:
    """method_contrast.csv/.parquet and lora_vs_full.png/.svg from the checkpoints, drift and weight_deltas CSVs an
    earlier analyze wrote in ``folder`` (no model needed); [] when there is nothing to contrast.

    ``d_model`` (the base's hidden size) sets the along-refusal chance level; without it that column is NaN.
    """
    import json

    from refusal_probe.analysis import tables
    from refusal_probe.analysis.contrast import method_contrast
    from refusal_probe.core.errors import UserError

    folder = Path(folder)
    need = [folder / f"{n}.csv" for n in ("checkpoints", "drift")]
    missing = [p.name for p in need if not p.is_file()]
    if missing:
        raise UserError(f"{folder}: no {', '.join(missing)}; run `refusal-probe analyze` first")
    ck, drift = (tables.read_table(folder, n, required=True) for n in ("checkpoints", "drift"))
    deltas = tables.read_table(folder, "weight_deltas")
    table = method_contrast(ck, drift, deltas, d_model)
    if not len(table):
        return []
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    written = tables.write_table(table, folder, "method_contrast")
    return written + plot_lora_vs_full(table, drift, deltas, folder, summary=summary)
