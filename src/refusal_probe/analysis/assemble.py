"""Joining the cached measurements into tables, correlations, figures, summary.json and the report (no model is
loaded here). Outputs of an earlier run into the same folder that this run does not write (``--no-deltas``: the
weight-delta tables and plots) are removed, so nothing stale sits beside the current results."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from refusal_probe.analysis.behaviour import signatures
from refusal_probe.analysis.readings import HOW as READINGS_HOW
from refusal_probe.analysis.tables import checkpoint_meta

# every table analyze may write; one not written by this run is stale
TABLES = (
    "drift",
    "weight_deltas",
    "behaviour",
    "direction_candidates",
    "checkpoints",
    "correlations",
    "per_layer_correlations",
    "method_contrast",
    "prompts",
    "predictions",
)
HOW = {
    "layer": "residual stream entering decoder block l (resid_pre)",
    "method_contrast": "each LoRA/QLoRA/DPO checkpoint beside full fine-tuning at the same lr (final checkpoints), "
    "at the nearest chrF and at the nearest update size ||dW||_F: drift depth, update size and concentration, "
    "along-refusal fraction vs chance 1/sqrt(d_model) (column meanings: analysis/contrast.py CONTRAST_DOCS)",
    "positions": "post-instruction tokens of the model's own chat template (negative offsets)",
    "direction": "difference of means, harmful - harmless, float64",
    "cos_to_base": "cosine of checkpoint's direction with the base's at the same layer and chosen position",
    "proj_*": "mean projection of activations on the base's chosen unit refusal direction",
    "probe_acc": "held-out accuracy of a standardised logistic-regression probe (25% test split)",
    "diffmean_acc": "held-out accuracy of the difference-of-means projection thresholded at the class midpoint",
    "delta_fro": "Frobenius norm of W_ckpt - W_base (LoRA: from factors, r x r Gram form), float64",
    "delta_along_refusal": "norm of r_hat^T dW for modules writing to the residual stream (o_proj, down_proj)",
    "score_*": "refusal score: Arditi's refusal-token log-odds at the last position, mean over the held-out "
    "harmful_val / harmless_val prompts, forward passes only (no generation)",
    "necessity_*": "score_harmful minus score_harmful with a direction of layer l (chosen position) projected out "
    "at every layer and position: base = the base model's direction, own = the checkpoint's difference of means; "
    "_ci_low/_ci_high: 95% percentile interval over paired resamples of the held-out prompts (also for sufficiency)",
    "sufficiency_base": "score_harmless with the base direction vector (not normalised) added to the residual "
    "stream entering block l, minus score_harmless (as in direction selection)",
    "causal_reading": READINGS_HOW,
    "noise floors": "split_half_cos, cos_to_base_ci_low/high, proj_gap_random_mean/sd per layer (probe/noise.py): "
    "the cosine of two disjoint prompt halves' directions (mean and sd over seeded splits; _sb stepped up to n "
    "prompts), a percentile interval from resampling the prompts against the fixed base direction, the gap on "
    "seeded random unit directions",
    "per_layer_correlations": "every layer's drift metric (cos_to_base, proj_gap) against refusal rate, in each "
    "correlation scope (see correlations), with run-bootstrap intervals; chosen = the run's refusal layer",
}


def ref_key(c) -> tuple[str | None, str]:
    """Runs share a base reference when they share the base model and its precision (QLoRA: the 4-bit base)."""
    return (c.base, c.quant.tag if c.quant else "")


def ref_name(key: tuple[str | None, str]) -> str:
    return f"{key[0]} ({key[1]})" if key[1] else str(key[0])


def tag(c, rows: list[dict]) -> list[dict]:
    meta = checkpoint_meta(c)
    return [{**meta, "module": r.get("module", ""), **r} for r in rows]


def _previous_outputs(out: Path) -> set[str]:
    """File names an earlier analyze run listed in its summary.json (tables and figures)."""
    try:
        prev = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(prev, dict):
        return set()
    names = [*prev.get("tables", []), *prev.get("figures", [])]
    return {n for n in names if isinstance(n, str) and "/" not in n and "\\" not in n}


def remove_stale(out: Path, written: set[str], previous: set[str]) -> list[str]:
    """Delete outputs of an earlier run that this run did not write; return their names."""
    stale = set(previous)
    stale |= {f"{t}.{ext}" for t in TABLES for ext in ("csv", "parquet")}
    removed = []
    for name in sorted(stale - written):
        path = out / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    if removed:
        print(
            f"removed {len(removed)} output(s) of an earlier run not written now: {', '.join(removed)}",
            file=sys.stderr,
        )
    return removed


def assemble(spec, out, tree, refs, entries, settings, sets, beh, beh_path, notes, elapsed) -> Path:
    """Tables, correlations, plots, summary.json and the report from the base references and checkpoint entries."""
    import pandas as pd

    from refusal_probe.analysis import contrast, contrast_plot, correlate, plots, report, tables

    previous = _previous_outputs(out)
    drift_rows: list[dict] = []
    delta_rows: list[dict] = []
    for c in tree:
        ref = refs[ref_key(c)]
        if c.kind == "base":
            drift_rows += tag(c, ref.rows)
            continue
        entry = entries[c.key]
        drift_rows += tag(c, entry["drift"])
        delta_rows += tag(c, entry["deltas"])

    drift = pd.DataFrame(drift_rows)
    deltas = pd.DataFrame(delta_rows)
    written = tables.write_table(drift, out, "drift") + (
        tables.write_table(deltas, out, "weight_deltas") if len(deltas) else []
    )
    if len(beh):
        written += tables.write_table(beh, out, "behaviour")
    direction_rows = []
    for key, ref in refs.items():
        cand = ref.result.scores.copy()
        cand.insert(0, "base", ref_name(key))
        direction_rows.append(cand)
    candidates = pd.concat(direction_rows, ignore_index=True)
    written += tables.write_table(candidates, out, "direction_candidates")

    layers = {c.run: refs[ref_key(c)].result.layer for c in tree}
    table = tables.checkpoint_table(drift, deltas, beh, layers)
    written += tables.write_table(table, out, "checkpoints")
    y_cols = [c for c in ("refusal_rate", "chrf") if c in table.columns]
    corr = correlate.correlate(table, None, y_cols) if y_cols else pd.DataFrame()
    per_layer = None
    if "refusal_rate" in y_cols:
        layer_corr = correlate.per_layer_correlations(drift, beh, refusal_layer=layers)
        written += tables.write_table(layer_corr, out, "per_layer_correlations") if len(layer_corr) else []
        per_layer = correlate.pooled_layers(layer_corr)  # the report's cos_to_base table (pooled scope)
    if len(corr):
        written += tables.write_table(corr, out, "correlations")
    width = {c.run: int(refs[ref_key(c)].result.direction.numel()) for c in tree}
    contrast_table = contrast.method_contrast(table, drift, deltas if len(deltas) else None, width)
    if len(contrast_table):
        written += tables.write_table(contrast_table, out, "method_contrast")
    from refusal_probe.analysis import per_prompt, predict

    prompts = per_prompt.prompt_table(tree, refs, entries, ref_key) if settings.prompt_internals else None
    if prompts is not None and len(prompts):
        written += tables.write_table(prompts, out, "prompts")
    if "refusal_rate" in y_cols:  # held-out predictions of the refusal rate from internals
        from refusal_probe.analysis.findings import refusal_n

        written += predict.write_predictions(table, prompts, out, refusal_n(beh))

    summary: dict[str, Any] = {
        "format": "refusal-probe/analysis/1",
        "tree": {"spec": str(spec), "root": str(tree.root) if tree.root else None, **tree.to_json()},
        "notes": notes,
        "bases": {
            ref_name(key): {
                "refusal_layer": ref.result.layer,
                "position": ref.result.position,
                "direction_norm": float(ref.result.direction.norm()),
                "chosen": ref.result.chosen,
                "warning": ref.result.warning,
                "direction_files": str(ref.dir),
                "direction_cache_key": ref.result.settings.get("cache_key"),
                "selection_settings": ref.result.settings,
            }
            for key, ref in refs.items()
        },
        "runs": {
            c.run: {"base": ref_name(ref_key(c)), "refusal_layer": refs[ref_key(c)].result.layer}
            for c in tree
            if c.kind == "base"
        },
        "checkpoints": [
            {
                "run": c.run,
                "checkpoint": c.name,
                "kind": str(getattr(c.kind, "value", c.kind)),
                "path": str(c.path),
                "base": c.base,
                "method": c.method,
                "lr": c.lr,
                "step": c.step,
                "fraction": c.fraction,
                "meta_source": c.meta_source,
            }
            for c in tree
        ],
        "settings": settings.key_fields(),
        "prompts": {k: {"n": len(v), "source": sets.sources[k]} for k, v in sets.prompts.items()},
        "how": {**HOW, "correlations": correlate.CORRELATIONS_HOW},
        "behaviour": str(beh_path) if beh_path else None,
        "signatures": signatures(beh),
        "elapsed_s": round(elapsed, 1),
        "versions": report.versions(),  # of the program that measured (the report adds its own)
        "tables": [p.name for p in written],
    }
    summary["how"].update(prompts=per_prompt.HOW, prediction=predict.HOW, predictions=predict.ROWS_HOW)
    kw: dict[str, Any] = dict(summary=summary, refusal_layer=layers)
    figures = plots.plot_drift_by_layer(drift, out, "cos_to_base", **kw)
    figures += plots.plot_drift_by_layer(drift, out, "proj_gap", **kw)
    if settings.separability:
        figures += plots.plot_drift_by_layer(drift, out, "probe_acc", **kw)
    figures += plots.plot_cos_heatmap(drift, out, **kw)
    figures += plots.plot_causal_drift(drift, out, **kw)
    # --causal-layers beyond the chosen one: necessity and sufficiency by layer too
    if drift[drift["metric"] == "necessity_base"]["layer"].nunique() > 1:
        figures += plots.plot_drift_by_layer(drift, out, "necessity_base", **kw)
        figures += plots.plot_drift_by_layer(drift, out, "sufficiency_base", **kw)
    if len(deltas):
        figures += plots.plot_delta_by_layer(deltas, out, summary=summary)
    figures += plots.plot_method_comparison(drift, deltas, beh, out, **kw)
    if len(beh):
        figures += plots.plot_behaviour(beh, table, out, summary=summary)
    figures += contrast_plot.plot_lora_vs_full(contrast_table, drift, deltas, out, summary=summary)
    summary["figures"] = [str(Path(f).name) for f in figures]
    remove_stale(out, {*summary["tables"], *summary["figures"]}, previous)
    from refusal_probe.core.io import write_json

    write_json(out / "summary.json", summary)
    report.write_report(out, summary, table, corr, figures, per_layer=per_layer)
    return out
