"""Figures of drift, weight change and behaviour over training, saved as PNG and SVG.

Matplotlib is used through ``matplotlib.figure.Figure`` (Agg canvas), never pyplot, so drawing needs no display
and leaves the caller's backend and global state alone. Every function returns the paths it wrote ([] when the
figure does not apply). Checkpoints are coloured by fraction of training (0 = base, 1 = end; step / last step
where the fraction is unknown) on one sequential colour map; the base model is drawn dashed.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from refusal_probe.analysis.contrast import ADAPTERS
from refusal_probe.analysis.paths import path_scrubber
from refusal_probe.analysis.tables import final_rows, refusal_layer_by_run, summary_bases
from refusal_probe.core.errors import require
from refusal_probe.core.io import atomic_write

# viridis without its last, pale-yellow stretch, which vanishes on a white background.
PROGRESS_CMAP = ListedColormap(matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, 256)), name="progress")
HEATMAP_CMAP = "magma"
METHOD_ORDER = ("full", "lora", "qlora", "dpo")
METHOD_COLORS = {"full": "tab:red", "lora": "tab:blue", "qlora": "tab:cyan", "dpo": "tab:purple"}
UNKNOWN_COLOR = "tab:gray"
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
RC: dict[Any, Any] = {
    "svg.hashsalt": "refusal-probe",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
}
SAVE_METADATA = {"png": {"Software": "refusal-probe (matplotlib)"}, "svg": {"Date": None}}
PNG_DPI = 150

METRIC_LABELS = {
    "cos_to_base": "cosine to base refusal direction",
    "norm_ratio": "|direction| / |base direction|",
    "proj_harmful": "harmful projection on base direction",
    "proj_harmless": "harmless projection on base direction",
    "proj_gap": "harmful - harmless projection",
    "probe_acc": "linear probe accuracy (held out)",
    "diffmean_acc": "difference-of-means accuracy (held out)",
    "dir_norm": "|difference-of-means direction|",
    "necessity_base": "refusal log-odds lost ablating the base direction",
    "sufficiency_base": "refusal log-odds gained adding the base direction",
    "delta_fro": "||W_ckpt - W_base||_F",
    "refusal_rate": "refusal rate (harmful prompts)",
    "chrf": "chrF",
}


# ----------------------------------------------------------------------------------------------- helpers


def caption(summary: Mapping | None, width: int = 150) -> str:
    """One or two lines saying which model, prompts and settings produced the numbers in a figure."""
    summary = summary or {}
    parts = []
    bases = summary_bases(summary)
    models = list(bases) or [str(summary[k]) for k in ("model", "base_model") if summary.get(k)]
    if models:
        parts.append("model: " + ", ".join(models))
    for spec, info in bases.items():
        bits = []
        if info.get("refusal_layer") is not None:
            bits.append(f"refusal layer {info['refusal_layer']}")
        if info.get("position") is not None:
            bits.append(f"position {info['position']}")
        if bits:
            parts.append((f"{spec}: " if len(bases) > 1 else "") + ", ".join(bits))
    if not bases and summary.get("refusal_layer") is not None:
        parts.append(f"refusal layer {summary['refusal_layer']}")
    prompts = summary.get("prompts") or {}
    if isinstance(prompts, Mapping) and prompts:
        items = []
        for name, info in prompts.items():
            n = info.get("n", info.get("count")) if isinstance(info, Mapping) else info
            items.append(f"{name} {n}" if n is not None else str(name))
        parts.append("prompts: " + ", ".join(items))
    settings = summary.get("settings") or {}
    if isinstance(settings, Mapping) and settings:
        parts.append("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    text = path_scrubber(summary)(" | ".join(parts)) or "refusal-probe analysis"  # no path of this machine
    lines = textwrap.wrap(text, width=width)
    if len(lines) > 2:
        lines = [lines[0], textwrap.shorten(" ".join(lines[1:]), width=width, placeholder=" ...")]
    return "\n".join(lines)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _progress(df: pd.DataFrame) -> pd.Series:
    """Fraction of training per row; step / last step of the run where the fraction is unknown."""
    frac = pd.to_numeric(df["fraction"], errors="coerce").astype(float)
    step = pd.to_numeric(df["step"], errors="coerce").astype(float)
    last = step.groupby(df["run"]).transform("max").replace(0, np.nan)
    return frac.where(np.isfinite(frac), step / last).fillna(0.0).clip(0.0, 1.0)


def _runs(df: pd.DataFrame) -> list[str]:
    """Runs ordered by method (full, lora, qlora, dpo, unknown), then learning rate high to low, then name."""
    meta = _run_meta(df)

    def key(run: str) -> tuple:
        method, lr = meta[run]
        rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
        return (rank, str(method or ""), -lr if np.isfinite(lr) else np.inf, run)

    return sorted(meta, key=key)


def _run_layout(df: pd.DataFrame) -> tuple[int, int, dict[str, int]]:
    """(rows, columns, run -> panel slot): one row per method when the sweep is a method x lr grid, else 3 across."""
    runs = _runs(df)
    meta = _run_meta(df)
    by_method: dict[str | None, list[str]] = {}
    for run in runs:
        by_method.setdefault(meta[run][0], []).append(run)
    widest = max((len(v) for v in by_method.values()), default=1)
    if len(runs) > 3 and widest <= 4 and len(by_method) * widest <= 2 * len(runs):
        slots = {
            run: i * widest + j for i, group in enumerate(by_method.values()) for j, run in enumerate(group)
        }
        return len(by_method), widest, slots
    ncols = max(1, min(len(runs), 3))
    return int(np.ceil(len(runs) / ncols)), ncols, {run: i for i, run in enumerate(runs)}


def _run_panels(
    df: pd.DataFrame, *, sharey: bool, panel: tuple[float, float] = (4.4, 3.3)
) -> tuple[Figure, dict[str, Any], set[str]]:
    """A figure with one panel per run; returns it, run -> axes, and the runs whose panel starts a row."""
    nrows, ncols, slots = _run_layout(df)
    fig = Figure(figsize=(panel[0] * ncols + 1.2, panel[1] * nrows + 1.0), layout="constrained")
    grid = fig.subplots(nrows, ncols, sharey=sharey, squeeze=False).ravel()
    used = set(slots.values())
    for k, ax in enumerate(grid):
        if k not in used:
            ax.set_visible(False)
    axes = {run: grid[slot] for run, slot in slots.items()}
    first = {run for run, slot in slots.items() if slot % ncols == 0}
    return fig, axes, first


def _run_meta(df: pd.DataFrame) -> dict[str, tuple[str | None, float]]:
    """run -> (method, lr) from the first row that has them."""
    out = {}
    for run, g in df.groupby("run", sort=True):
        m = g["method"].dropna()
        lr = pd.to_numeric(g["lr"], errors="coerce").dropna()
        out[run] = (
            str(m.iloc[0]) if len(m) and m.iloc[0] else None,
            float(lr.iloc[0]) if len(lr) else np.nan,
        )
    return out


def _run_title(run: str, method: str | None, lr: float) -> str:
    bits = [method or "method ?"]
    if np.isfinite(lr):
        bits.append(f"lr {lr:g}")
    return f"{run} ({', '.join(bits)})"


def _run_styles(df: pd.DataFrame) -> dict[str, dict]:
    """Colour per method, line style and marker per learning rate (rank of lr within the method)."""
    meta = _run_meta(df)
    lrs: dict[str | None, list[float]] = {}
    for method, lr in meta.values():
        lrs.setdefault(method, [])
        if lr not in lrs[method] and np.isfinite(lr):
            lrs[method].append(lr)
    styles = {}
    for run, (method, lr) in meta.items():
        order = sorted(lrs[method], reverse=True)
        i = order.index(lr) if lr in order else len(order)
        styles[run] = {
            "color": METHOD_COLORS.get(method or "", UNKNOWN_COLOR),
            "linestyle": LINESTYLES[i % len(LINESTYLES)],
            "marker": MARKERS[i % len(MARKERS)],
            "label": _run_title(run, method, lr),
        }
    return styles


def _grid(fig: Figure, n: int, *, sharey: bool = True, max_cols: int = 3) -> list:
    ncols = max(1, min(n, max_cols))
    nrows = int(np.ceil(n / ncols))
    axes = fig.subplots(nrows, ncols, sharey=sharey, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _figure(n_panels: int, *, max_cols: int = 3, panel: tuple[float, float] = (4.4, 3.3)) -> Figure:
    ncols = max(1, min(n_panels, max_cols))
    nrows = int(np.ceil(max(n_panels, 1) / ncols))
    return Figure(figsize=(panel[0] * ncols + 1.2, panel[1] * nrows + 1.0), layout="constrained")


def _finish(fig: Figure, title: str, summary: Mapping | None) -> None:
    fig.suptitle(title, fontsize=12)
    # about 15 characters of 7.5 pt text per inch of figure width
    fig.supxlabel(caption(summary, width=max(60, int(fig.get_figwidth() * 15))), fontsize=7.5, color="0.35")


def _save(fig: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """PNG then SVG; the layout solved for the PNG is kept for the SVG (solving it again doubled the time)."""
    out_dir = Path(out_dir)
    paths = []
    for fmt in ("png", "svg"):
        if fmt == "svg":
            fig.set_layout_engine("none")
        kw: dict[str, Any] = {"dpi": PNG_DPI} if fmt == "png" else {}
        paths.append(
            atomic_write(
                out_dir / f"{stem}.{fmt}",
                functools.partial(fig.savefig, format=fmt, metadata=SAVE_METADATA[fmt], **kw),
            )
        )
    return paths


def _progress_colorbar(fig: Figure, axes: list) -> None:
    sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=PROGRESS_CMAP)
    fig.colorbar(sm, ax=axes, label="fraction of training (0 = base)", shrink=0.6, aspect=30)


def _mark_layer(ax, layer: int | None, *, label: bool = True) -> None:
    if layer is not None:
        ax.axvline(layer, color="tab:red", linestyle=":", linewidth=1.2, label=f"refusal layer {layer}")


def _layers_for(df: pd.DataFrame, summary: Mapping | None, refusal_layer) -> dict[str, int | None]:
    runs = _runs(df)
    if refusal_layer is None:
        return refusal_layer_by_run(summary, runs)
    if isinstance(refusal_layer, Mapping):
        return {r: refusal_layer.get(r) for r in runs}
    return {r: int(refusal_layer) for r in runs}


def _checkpoint_lines(ax, data: pd.DataFrame, x: str, y: str, **kw) -> None:
    """One line per checkpoint (step) of one run: base dashed grey-black, others coloured by progress."""
    data = data.assign(_p=_progress(data))
    for step, g in data.groupby("step", sort=True):
        g = g.sort_values(x)
        base = step == 0
        ax.plot(
            g[x],
            g[y],
            color="0.15" if base else PROGRESS_CMAP(float(g["_p"].iloc[0])),
            linestyle="--" if base else kw.get("linestyle", "-"),
            marker="" if base else kw.get("marker", "o"),
            markersize=3,
            linewidth=1.4,
            zorder=3 if base else 2,
        )


def _module_kind(module: str) -> str:
    m = str(module).lower()
    if "attn" in m or "attention" in m:
        return "attention"
    if "mlp" in m or "ffn" in m or "feed_forward" in m:
        return "MLP"
    return "other"


def _layer_norms(deltas: pd.DataFrame) -> pd.DataFrame:
    """Per (run, step, layer): root-sum-square of delta_fro over all modules, attention modules and MLP modules."""
    d = deltas[(deltas["metric"] == "delta_fro") & (pd.to_numeric(deltas["layer"]) >= 0)].copy()
    if not len(d):
        return pd.DataFrame(columns=["run", "method", "lr", "step", "fraction", "layer", "kind", "value"])
    d["kind"] = d["module"].map(_module_kind)
    d["sq"] = d["value"].astype(np.float64) ** 2
    keys = ["run", "step", "layer"]
    meta = d.groupby(keys, dropna=False)[["method", "lr", "fraction"]].first().reset_index()
    total = d.groupby(keys, dropna=False)["sq"].sum().reset_index().assign(kind="all modules")
    kinds = d.groupby([*keys, "kind"], dropna=False)["sq"].sum().reset_index()
    out = pd.concat([total, kinds], ignore_index=True)
    out["value"] = np.sqrt(out.pop("sq"))
    return out.merge(meta, on=keys, how="left")


# ----------------------------------------------------------------------------------------------- figures


def plot_drift_by_layer(
    drift: pd.DataFrame,
    out_dir: str | Path,
    metric: str = "cos_to_base",
    *,
    summary: Mapping | None = None,
    refusal_layer: int | Mapping[str, int] | None = None,
) -> list[Path]:
    """Drift ``metric`` against layer, one line per checkpoint, one panel per run; the refusal layer marked."""
    if drift is None or not len(drift):
        return []
    require(
        metric in set(drift["metric"]),
        f"drift table has no metric {metric!r}; have {sorted(set(drift['metric']))}",
    )
    d = drift[drift["metric"] == metric]
    runs = _runs(d)
    meta = _run_meta(d)
    layers = _layers_for(d, summary, refusal_layer)
    with matplotlib.rc_context(RC):
        fig, panels, first = _run_panels(d, sharey=True)
        axes = [panels[r] for r in runs]
        for ax, run in zip(axes, runs, strict=True):
            _checkpoint_lines(ax, d[d["run"] == run], "layer", "value")
            _mark_layer(ax, layers.get(run))
            ax.set_title(_run_title(run, *meta[run]))
            ax.set_xlabel("layer (residual stream entering block)")
            ax.grid(alpha=0.3)
            if run in first:
                ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        handles = [Line2D([], [], color="0.15", linestyle="--", label="base (step 0)")]
        if any(v is not None for v in layers.values()):
            handles.append(Line2D([], [], color="tab:red", linestyle=":", label="refusal layer"))
        axes[0].legend(handles=handles, loc="best", fontsize=8)
        _progress_colorbar(fig, axes)
        _finish(fig, f"{_cap(METRIC_LABELS.get(metric, metric))} by layer, per checkpoint", summary)
        return _save(fig, out_dir, f"drift_{metric}_by_layer")


def plot_cos_heatmap(
    drift: pd.DataFrame,
    out_dir: str | Path,
    *,
    summary: Mapping | None = None,
    refusal_layer: int | Mapping[str, int] | None = None,
) -> list[Path]:
    """cos_to_base as a layer x training-step heatmap, one panel per run (one colour scale for all panels)."""
    if drift is None or not len(drift):
        return []
    d = drift[drift["metric"] == "cos_to_base"]
    if not len(d):
        return []
    runs = _runs(d)
    meta = _run_meta(d)
    layers = _layers_for(d, summary, refusal_layer)
    values = d["value"].astype(float)
    vmin = float(np.nanmin(values)) if np.isfinite(values).any() else 0.0
    vmin = min(vmin, 0.99)
    with matplotlib.rc_context(RC):
        fig, panels, first = _run_panels(d, sharey=False)
        axes = [panels[r] for r in runs]
        image: Any = None
        for ax, run in zip(axes, runs, strict=True):
            g = d[d["run"] == run]
            grid = g.pivot_table(index="layer", columns="step", values="value", aggfunc="mean").sort_index()
            frac = g.groupby("step")["fraction"].first()
            image = ax.imshow(
                grid.to_numpy(dtype=float),
                aspect="auto",
                origin="lower",
                cmap=HEATMAP_CMAP,
                vmin=vmin,
                vmax=1.0,
                interpolation="nearest",
            )
            steps = list(grid.columns)
            ax.set_xticks(range(len(steps)))
            ax.set_xticklabels(
                [f"{s}\n({frac[s]:.0%})" if pd.notna(frac.get(s)) else f"{s}" for s in steps], fontsize=7
            )
            ticks = np.arange(len(grid.index))
            stride = max(1, len(ticks) // 12)
            ax.set_yticks(ticks[::stride])
            ax.set_yticklabels([str(v) for v in grid.index[::stride]])
            layer = layers.get(run)
            if layer is not None and layer in grid.index:
                row = list(grid.index).index(layer)
                ax.add_patch(
                    Rectangle(
                        (-0.5, row - 0.5), len(steps), 1, fill=False, edgecolor="tab:cyan", linewidth=1.5
                    )
                )
            if grid.size <= 60 and len(grid.index) <= 16:
                arr = grid.to_numpy(dtype=float)
                for (r, c), v in np.ndenumerate(arr):
                    if np.isfinite(v):
                        shade = (v - vmin) / max(1.0 - vmin, 1e-12)
                        ax.text(
                            c,
                            r,
                            f"{v:.2f}",
                            ha="center",
                            va="center",
                            fontsize=6,
                            color="black" if shade > 0.6 else "white",
                        )
            ax.set_title(_run_title(run, *meta[run]))
            ax.set_xlabel("training step (fraction)")
            if run in first:
                ax.set_ylabel("layer")
        fig.colorbar(image, ax=axes, label="cosine to base refusal direction", shrink=0.6, aspect=30)
        _finish(
            fig,
            "Refusal-direction drift: cosine to the base model's direction (refusal layer boxed)",
            summary,
        )
        return _save(fig, out_dir, "cos_heatmap")


def plot_delta_by_layer(
    deltas: pd.DataFrame, out_dir: str | Path, *, summary: Mapping | None = None
) -> list[Path]:
    """Per-layer weight change ||dW||_F (all modules, attention, MLP), one line per checkpoint, one panel per run."""
    if deltas is None or not len(deltas):
        return []
    norms = _layer_norms(deltas)
    norms = norms[norms["step"] != 0]
    if not len(norms):
        return []
    runs = _runs(norms)
    meta = _run_meta(norms)
    kinds = [k for k in ("all modules", "attention", "MLP") if k in set(norms["kind"])]
    styles: dict[str, Any] = dict(zip(("all modules", "attention", "MLP"), ("-", "--", ":"), strict=True))
    positive = norms["value"][norms["value"] > 0]
    log = bool(len(positive)) and float(positive.max() / positive.min()) > 30
    with matplotlib.rc_context(RC):
        fig, panels, first = _run_panels(norms, sharey=True)
        axes = [panels[r] for r in runs]
        for ax, run in zip(axes, runs, strict=True):
            r = norms[norms["run"] == run]
            for kind in kinds:
                _checkpoint_lines(
                    ax,
                    r[r["kind"] == kind],
                    "layer",
                    "value",
                    linestyle=styles[kind],
                    marker="o" if kind == "all modules" else "",
                )
            ax.set_title(_run_title(run, *meta[run]))
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3, which="both")
            if log:
                ax.set_yscale("log")
            if run in first:
                ax.set_ylabel("||W_ckpt - W_base||_F")
        axes[0].legend(
            handles=[Line2D([], [], color="0.3", linestyle=styles[k], label=k) for k in kinds],
            fontsize=8,
            loc="best",
        )
        _progress_colorbar(fig, axes)
        scale = " (log scale)" if log else ""
        _finish(
            fig, f"How much the weights moved, per layer: root-sum-square of module norms{scale}", summary
        )
        return _save(fig, out_dir, "delta_by_layer")


def _matched_runs(drift: pd.DataFrame) -> tuple[list[str], str]:
    """Runs to compare: those at learning rates shared by full and (Q)LoRA runs, else all runs."""
    meta = _run_meta(drift)
    full = {lr for m, lr in meta.values() if m == "full" and np.isfinite(lr)}
    lora = {lr for m, lr in meta.values() if m in ADAPTERS and np.isfinite(lr)}
    shared = full & lora
    if shared:
        runs = [r for r, (_, lr) in meta.items() if lr in shared]
        return runs, "matched lr " + ", ".join(f"{lr:g}" for lr in sorted(shared))
    return list(meta), "no learning rate shared by full and LoRA runs: all runs shown"


def _behaviour_panel(ax, behaviour: pd.DataFrame, metric: str, styles: dict, xlabel: str) -> None:
    """One behaviour metric against fraction of training, one line per run."""
    b = behaviour[behaviour["metric"] == metric]
    b = b.assign(_p=_progress(b))
    for run, g in b.groupby("run", sort=True):
        g = g.sort_values("_p")
        ax.plot(g["_p"], g["value"], markersize=4, **styles[run])
    label = METRIC_LABELS.get(metric, metric)
    ax.set(xlabel=xlabel, ylabel=label, title=f"{_cap(label)} during training")


def plot_method_comparison(
    drift: pd.DataFrame,
    deltas: pd.DataFrame | None,
    behaviour: pd.DataFrame | None,
    out_dir: str | Path,
    *,
    summary: Mapping | None = None,
    refusal_layer: int | Mapping[str, int] | None = None,
) -> list[Path]:
    """Full fine-tuning vs LoRA/QLoRA side by side; [] unless both kinds of run are present."""
    if drift is None or not len(drift):
        return []
    methods = set(drift["method"].dropna())
    if "full" not in methods or not methods & set(ADAPTERS):
        return []
    runs, note = _matched_runs(drift)
    styles = _run_styles(drift[drift["run"].isin(runs)])
    cos = final_rows(drift[(drift["metric"] == "cos_to_base") & drift["run"].isin(runs)])
    norms = _layer_norms(deltas) if deltas is not None and len(deltas) else None
    if norms is not None:
        norms = final_rows(norms[(norms["kind"] == "all modules") & norms["run"].isin(runs)])
    beh = behaviour[behaviour["run"].isin(runs)] if behaviour is not None and len(behaviour) else None
    panels = ["cos"] + (["delta"] if norms is not None and len(norms) else [])
    if beh is not None:
        panels += [m for m in ("refusal_rate", "chrf") if m in set(beh["metric"])]
    layers = _layers_for(cos, summary, refusal_layer)
    shared_layers = {v for v in layers.values() if v is not None}
    with matplotlib.rc_context(RC):
        fig = _figure(len(panels), max_cols=2, panel=(5.0, 3.4))
        axes = _grid(fig, len(panels), sharey=False, max_cols=2)
        for ax, panel in zip(axes, panels, strict=True):
            if panel == "cos":
                for run, g in cos.groupby("run", sort=True):
                    g = g.sort_values("layer")
                    ax.plot(g["layer"], g["value"], markersize=3, **styles[run])
                for layer in sorted(shared_layers):
                    _mark_layer(ax, layer)
                ax.set(
                    xlabel="layer",
                    ylabel=METRIC_LABELS["cos_to_base"],
                    title="Direction drift at final checkpoint",
                )
            elif panel == "delta" and norms is not None:
                for run, g in norms.groupby("run", sort=True):
                    g = g.sort_values("layer")
                    ax.plot(g["layer"], g["value"], markersize=3, **styles[run])
                ax.set_yscale("log")
                ax.set(
                    xlabel="layer",
                    ylabel="||dW||_F per layer (log)",
                    title="Weight change at final checkpoint",
                )
            else:
                _behaviour_panel(ax, beh, panel, styles, "fraction of training")
            ax.grid(alpha=0.3, which="both")
        axes[0].legend(fontsize=7, loc="best")
        _finish(fig, f"Full fine-tuning vs LoRA ({note})", summary)
        return _save(fig, out_dir, "method_comparison")


def plot_behaviour(
    behaviour: pd.DataFrame | None,
    checkpoint_table: pd.DataFrame | None,
    out_dir: str | Path,
    *,
    summary: Mapping | None = None,
) -> list[Path]:
    """Refusal rate and chrF against fraction of training, and refusal rate against cos_to_base at the refusal layer."""
    if behaviour is None or not len(behaviour):
        return []
    styles = _run_styles(behaviour)
    metrics = [m for m in ("refusal_rate", "chrf") if m in set(behaviour["metric"])]
    scatter = (
        checkpoint_table is not None
        and {"refusal_rate", "cos_to_base_at_rl"} <= set(checkpoint_table.columns)
        and bool((checkpoint_table[["refusal_rate", "cos_to_base_at_rl"]].notna().all(axis=1)).any())
    )
    n = len(metrics) + int(scatter)
    if n == 0:
        return []
    with matplotlib.rc_context(RC):
        fig = _figure(n, max_cols=3, panel=(4.6, 3.4))
        axes = _grid(fig, n, sharey=False)
        for ax, metric in zip(axes[: len(metrics)], metrics, strict=True):
            _behaviour_panel(ax, behaviour, metric, styles, "fraction of training (0 = base)")
            ax.grid(alpha=0.3)
        if scatter and checkpoint_table is not None:
            ax = axes[len(metrics)]
            t = checkpoint_table.dropna(subset=["refusal_rate", "cos_to_base_at_rl"])
            base = t[t["step"] == 0]
            t = t[t["step"] != 0]
            for method, g in t.groupby(t["method"].fillna("unknown"), sort=True):
                ax.scatter(
                    g["cos_to_base_at_rl"],
                    g["refusal_rate"],
                    s=22,
                    label=method,
                    color=METHOD_COLORS.get(method, UNKNOWN_COLOR),
                    edgecolor="white",
                    linewidth=0.5,
                )
            if len(base):
                ax.scatter(
                    base["cos_to_base_at_rl"],
                    base["refusal_rate"],
                    s=60,
                    marker="*",
                    color="0.1",
                    label="base",
                    zorder=3,
                )
            ax.set(
                xlabel="cosine to base direction at refusal layer",
                ylabel=METRIC_LABELS["refusal_rate"],
                title="Refusal vs direction drift (one point per checkpoint)",
            )
            ax.legend(fontsize=8, title="method", title_fontsize=8)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, loc="best")
        _finish(fig, "Behaviour over training", summary)
        return _save(fig, out_dir, "behaviour")


# ----------------------------------------------------------------------------------------------- the study's figures


def _wilson_err(rate: pd.Series, n: int | None) -> np.ndarray | None:
    """Asymmetric error bars (2 x len) of Wilson 95% intervals for refusal rates judged on n prompts."""
    if not n:
        return None
    from refusal_probe.analysis.uncertainty import rate_interval

    r = pd.to_numeric(rate, errors="coerce").to_numpy(dtype=float)
    ci = np.array([rate_interval(v, n) for v in r]).reshape(-1, 2)
    return np.vstack([r - ci[:, 0], ci[:, 1] - r])


def _behaviour_rows(table: pd.DataFrame | None) -> pd.DataFrame | None:
    if table is None or not len(table) or not {"refusal_rate", "chrf", "run", "step"} <= set(table.columns):
        return None
    t = table.dropna(subset=["refusal_rate", "chrf"]).copy()
    t["lr"] = pd.to_numeric(t["lr"], errors="coerce")
    t["step"] = pd.to_numeric(t["step"], errors="coerce")
    return t if len(t) else None


def figure1_lr(table: pd.DataFrame) -> float | None:
    """The learning rate Figure 1 shows: the one with the most methods (then most runs, then the highest)."""
    t = table[table["step"] > 0].dropna(subset=["lr"])
    if not len(t):
        return None
    g = t.groupby("lr").agg(methods=("method", "nunique"), runs=("run", "nunique")).reset_index()
    return float(g.sort_values(["methods", "runs", "lr"], ascending=False).iloc[0]["lr"])


def figure1_refusal_vs_chrf(
    table: pd.DataFrame | None,
    out_dir: str | Path,
    *,
    lr: float | None = None,
    n: int | None = None,
    summary: Mapping | None = None,
) -> list[Path]:
    """Figure 1: refusal rate against chrF at one learning rate; each run's checkpoints are a path from its base."""
    t = _behaviour_rows(table)
    if t is None:
        return []
    lr = figure1_lr(t) if lr is None else lr
    if lr is None:
        return []
    runs = [r for r in _runs(t) if np.isclose(t.loc[t["run"] == r, "lr"].dropna(), lr).any()]
    if not runs:
        return []
    styles = _run_styles(t[t["run"].isin(runs)])
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(6.4, 4.8), layout="constrained")
        ax = fig.subplots()
        for run in runs:
            g = t[t["run"] == run].sort_values("step")
            st = styles[run]
            err = _wilson_err(g["refusal_rate"], n)
            ax.errorbar(
                g["chrf"],
                g["refusal_rate"],
                yerr=err,
                color=st["color"],
                linestyle=st["linestyle"],
                marker=st["marker"],
                markersize=4,
                capsize=2,
                elinewidth=0.7,
                label=st["label"],
            )
            x, y = g["chrf"].to_numpy(float), g["refusal_rate"].to_numpy(float)
            for i in range(1, len(g)):
                ax.annotate(
                    "",
                    xy=(x[i], y[i]),
                    xytext=(x[i - 1], y[i - 1]),
                    arrowprops={"arrowstyle": "->", "color": st["color"], "lw": 1.0},
                )
        base = t[(t["step"] == 0) & t["run"].isin(runs)].drop_duplicates(["chrf", "refusal_rate"])
        ax.scatter(base["chrf"], base["refusal_rate"], s=120, marker="*", color="0.1", zorder=4, label="base")
        ax.set(
            xlabel="chrF (translation quality)",
            ylabel=METRIC_LABELS["refusal_rate"],
            ylim=(-0.03, 1.03),
            title=f"Refusal vs chrF at lr {lr:g}: each run from its base (star) through its checkpoints",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        _finish(fig, "Figure 1: what fine-tuning traded", summary)
        return _save(fig, out_dir, "figure1_refusal_vs_chrf")


def figure2_over_checkpoints(
    table: pd.DataFrame | None,
    out_dir: str | Path,
    *,
    n: int | None = None,
    summary: Mapping | None = None,
) -> list[Path]:
    """Figure 2: refusal rate (top row) and chrF (bottom row) over training, one column per learning rate, one
    line per run coloured by method."""
    t = _behaviour_rows(table)
    if t is None:
        return []
    lrs = sorted({float(v) for v in t.loc[t["step"] > 0, "lr"].dropna()}, reverse=True)
    if not lrs:
        return []
    t = t.assign(_p=_progress(t))
    styles = _run_styles(t)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(max(7.0, 3.8 * len(lrs) + 1.2), 6.6), layout="constrained")
        axes = fig.subplots(2, len(lrs), sharex=True, sharey="row", squeeze=False)
        for j, lr in enumerate(lrs):
            at = t[np.isclose(t["lr"].astype(float), lr)]
            for run in _runs(at):
                g = at[at["run"] == run].sort_values("_p")
                st = styles[run]
                axes[0, j].errorbar(
                    g["_p"],
                    g["refusal_rate"],
                    yerr=_wilson_err(g["refusal_rate"], n),
                    capsize=2,
                    elinewidth=0.7,
                    markersize=4,
                    **st,
                )
                axes[1, j].plot(g["_p"], g["chrf"], markersize=4, **st)
            axes[0, j].set(title=f"lr {lr:g}", ylim=(-0.03, 1.03))
            axes[1, j].set(xlabel="fraction of training (0 = base)")
            axes[0, j].legend(fontsize=6.5, loc="best")
            for ax in axes[:, j]:
                ax.grid(alpha=0.3)
        ci = f"\n(bars: Wilson 95%, n = {n} prompts)" if n else ""
        axes[0, 0].set_ylabel(METRIC_LABELS["refusal_rate"] + ci)
        axes[1, 0].set_ylabel(METRIC_LABELS["chrf"])
        _finish(fig, "Figure 2: refusal and chrF over training", summary)
        return _save(fig, out_dir, "figure2_over_checkpoints")


CAUSAL_SERIES = (
    ("necessity_base", "necessity, base direction (harmful: score - ablated)", "tab:red", "o", "-"),
    ("necessity_own", "necessity, own direction (harmful: score - ablated)", "tab:orange", "s", "--"),
    ("sufficiency_base", "sufficiency, base direction (harmless: added - score)", "tab:blue", "^", "-"),
)


def plot_causal_drift(
    drift: pd.DataFrame,
    out_dir: str | Path,
    *,
    summary: Mapping | None = None,
    refusal_layer: int | Mapping[str, int] | None = None,
) -> list[Path]:
    """Necessity (base and own direction) and sufficiency (base direction) at the refusal layer against training
    step, one panel per run; [] when the drift table has no causal rows (--no-causal)."""
    names = [s[0] for s in CAUSAL_SERIES]
    if drift is None or not len(drift) or not set(names) & set(drift["metric"]):
        return []
    d = drift[drift["metric"].isin(names)]
    runs = _runs(d)
    meta = _run_meta(d)
    layers = _layers_for(d, summary, refusal_layer)
    with matplotlib.rc_context(RC):
        fig, panels, first = _run_panels(d, sharey=True)
        axes = [panels[r] for r in runs]
        for ax, run in zip(axes, runs, strict=True):
            g = d[d["run"] == run]
            layer = layers.get(run)
            if layer is not None:
                g = g[pd.to_numeric(g["layer"]) == layer]
            for metric, label, color, marker, style in CAUSAL_SERIES:
                s = g[g["metric"] == metric].sort_values("step")
                ax.plot(
                    s["step"],
                    s["value"],
                    color=color,
                    marker=marker,
                    linestyle=style,
                    markersize=4,
                    label=label,
                )
            ax.axhline(0.0, color="0.5", linewidth=0.8)
            ax.set_title(_run_title(run, *meta[run]) + (f", layer {layer}" if layer is not None else ""))
            ax.set_xlabel("training step (0 = base)")
            ax.grid(alpha=0.3)
            if run in first:
                ax.set_ylabel("change in refusal log-odds")
        axes[0].legend(loc="best", fontsize=7)
        _finish(fig, "Causal drift at the refusal layer", summary)
        return _save(fig, out_dir, "causal_drift")
