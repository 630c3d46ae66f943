"""The report's findings: a few sentences computed from the analysis tables, each stating its numbers.

Pure functions over the checkpoint table (``checkpoints.csv``), the correlations table and, when present,
``method_contrast.csv``, ``prediction.json`` and the causal ``*_at_rl`` columns. A finding whose input is absent
says so instead of being left out, so a reader knows what was not measured. Refusal rates carry a Wilson 95%
interval from the n prompts they were judged on; a change of refusal a Newcombe (hybrid score) interval, which
treats the two evaluations as independent samples (the prompts are the same, so it is if anything conservative).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from refusal_probe.analysis.contrast import ADAPTERS, headline
from refusal_probe.analysis.predict import GOALS
from refusal_probe.analysis.tables import final_checkpoints
from refusal_probe.analysis.uncertainty import newcombe_diff, rate_interval, wilson
from refusal_probe.probe.causal import (
    DERIVED as CAUSAL_METRICS,  # necessity_base, necessity_own, sufficiency_base
)

LUMP = ADAPTERS  # adapter methods compared with full fine-tuning (contrast.py)
PREDICTION_KEYS = re.compile(r"(mae|spearman|auroc|rmse|coverage)", re.IGNORECASE)
PREDICTION_TARGETS = {"mae": ("<=", GOALS["mae"]), "auroc": (">=", GOALS["auroc"])}  # predict.py's goals


@dataclass(frozen=True)
class Finding:
    """One finding: a headline sentence, optional bullet points, and whether its inputs were there at all."""

    key: str
    title: str
    text: str
    available: bool = True
    items: tuple[str, ...] = field(default_factory=tuple)


# ----------------------------------------------------------------------------------------------- prompt count


def prompt_count(signature: str | None) -> int | None:
    """The number of prompts a behaviour signature says it was computed on (``data=advbench,n=32`` -> 32)."""
    m = re.search(r"data=[^,|]*,n=(\d+)", str(signature or ""))
    return int(m.group(1)) if m else None


def refusal_n(behaviour: pd.DataFrame | None, signatures: Mapping | None = None) -> int | None:
    """The refusal rate's prompt count: the most common one in the behaviour table, else in summary signatures."""
    counts: list[int] = []
    if behaviour is not None and len(behaviour) and {"metric", "signature"} <= set(behaviour.columns):
        sigs = behaviour.loc[behaviour["metric"] == "refusal_rate", "signature"]
        counts = [n for n in (prompt_count(s) for s in sigs) if n]
    if not counts and signatures:
        counts = [
            n for k, s in signatures.items() if str(k).startswith("refusal_rate") if (n := prompt_count(s))
        ]
    if not counts:
        return None
    values, freq = np.unique(counts, return_counts=True)
    return int(values[int(np.argmax(freq))])


# ----------------------------------------------------------------------------------------------- formatting


def pct(p: float) -> str:
    return "n/a" if not math.isfinite(p) else f"{100 * p:.0f}%"


def num(v: Any, digits: int = 3) -> str:
    if v is None:  # prediction.json writes NaN as null
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "n/a"
    return f"{f:.{digits}g}"


def _interval(lo: float, hi: float, scale: float = 1.0, digits: int = 2) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "no interval"
    if scale == 100:
        return f"[{100 * lo:.0f}%, {100 * hi:.0f}%]"
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def _run_label(run: str, method: Any, lr: Any) -> str:
    bits = [str(method)] if isinstance(method, str) and method else []
    if _finite(lr):
        bits.append(f"lr {float(lr):g}")
    return f"`{run}`" + (f" ({', '.join(bits)})" if bits else "")


def _step(r: Mapping) -> int | str:
    """A checkpoint's step as the findings name it: the number, or the checkpoint's name when it has none."""
    return int(float(r["step"])) if _finite(r.get("step")) else str(r.get("checkpoint", "final"))


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------- per run


def run_changes(table: pd.DataFrame, n: int | None) -> pd.DataFrame:
    """Per run: refusal and chrF at the base (step 0) and at the last checkpoint, with intervals where n is known.

    Columns: run, method, lr, step, base_refusal, final_refusal, base_lo, base_hi, final_lo, final_hi, change,
    change_lo, change_hi, base_chrf, final_chrf, verdict ("lost" / "gained" when the change's interval excludes 0,
    "kept" when it does not, "unknown" without n)."""
    rows = []
    finals = final_checkpoints(table)
    for run, g in table.groupby("run", sort=True):
        base, final = g[pd.to_numeric(g["step"], errors="coerce") == 0], finals[finals["run"] == run]
        if not len(base) or not len(final):
            continue
        b, f = base.iloc[0], final.iloc[-1]
        rb, rf = float(b.get("refusal_rate", np.nan)), float(f.get("refusal_rate", np.nan))
        row: dict[str, Any] = {
            "run": run,
            "method": f.get("method"),
            "lr": f.get("lr"),
            "step": _step(f),
            "base_refusal": rb,
            "final_refusal": rf,
            "change": rf - rb,
            "base_chrf": float(b.get("chrf", np.nan)),
            "final_chrf": float(f.get("chrf", np.nan)),
        }
        if n and math.isfinite(rb) and math.isfinite(rf):
            kb, kf = round(rb * n), round(rf * n)
            row["base_lo"], row["base_hi"] = wilson(kb, n)
            row["final_lo"], row["final_hi"] = wilson(kf, n)
            row["change_lo"], row["change_hi"] = newcombe_diff(kb, n, kf, n)
            row["verdict"] = "lost" if row["change_hi"] < 0 else "gained" if row["change_lo"] > 0 else "kept"
        else:
            row.update(base_lo=np.nan, base_hi=np.nan, final_lo=np.nan, final_hi=np.nan)
            row.update(change_lo=np.nan, change_hi=np.nan, verdict="unknown")
        rows.append(row)
    return pd.DataFrame(rows)


def _change_item(r: Mapping, n: int | None) -> str:
    text = (
        f"{_run_label(r['run'], r['method'], r['lr'])}: refusal {pct(r['base_refusal'])} "
        f"{_interval(r['base_lo'], r['base_hi'], 100)} at the base -> {pct(r['final_refusal'])} "
        f"{_interval(r['final_lo'], r['final_hi'], 100)} at step {r['step']}"
    )
    if math.isfinite(r["change"]):
        text += f", change {100 * r['change']:+.0f} points"
        if math.isfinite(r["change_lo"]):
            text += f" (95% interval {100 * r['change_lo']:+.0f} to {100 * r['change_hi']:+.0f})"
    if math.isfinite(r["base_chrf"]) and math.isfinite(r["final_chrf"]):
        text += f"; chrF {r['base_chrf']:.1f} -> {r['final_chrf']:.1f}"
    return text


def refusal_loss(table: pd.DataFrame | None, n: int | None) -> Finding:
    """Which runs lost refusal (base -> last checkpoint) beyond the sampling noise of n prompts, and how much."""
    title = "Which runs lost refusal"
    if table is None or not len(table) or "refusal_rate" not in table.columns:
        return Finding(
            "refusal_loss", title, "Not available: no refusal rates (run `refusal-probe eval`).", False
        )
    ch = run_changes(table, n)
    if not len(ch) or not ch["change"].notna().any():
        return Finding(
            "refusal_loss",
            title,
            "Not available: no run has refusal rates at both base and a checkpoint.",
            False,
        )
    items = tuple(_change_item(r, n) for r in ch.sort_values("change").to_dict("records"))
    worst = ch.loc[ch["change"].idxmin()]
    if n is None:
        text = (
            f"The number of judged prompts is not recorded, so no interval: the largest drop is "
            f"{_run_label(worst['run'], worst['method'], worst['lr'])}, {pct(worst['base_refusal'])} -> "
            f"{pct(worst['final_refusal'])}."
        )
        return Finding("refusal_loss", title, text, True, items)
    lost = ch[ch["verdict"] == "lost"]
    text = (
        f"{len(lost)} of {len(ch)} runs lost refusal beyond sampling noise (the 95% interval of the change from "
        f"the base to the last checkpoint excludes 0; n = {n} prompts per checkpoint)"
    )
    text += ": " + ", ".join(f"`{r}`" for r in lost["run"]) + "." if len(lost) else "."
    if worst["change"] < 0:
        text += (
            f" The largest drop: {_run_label(worst['run'], worst['method'], worst['lr'])}, "
            f"{pct(worst['base_refusal'])} -> {pct(worst['final_refusal'])} "
            f"({100 * worst['change']:+.0f} points, 95% interval {100 * worst['change_lo']:+.0f} to "
            f"{100 * worst['change_hi']:+.0f})."
        )
    lo, hi = wilson(n / 2, n)  # the widest Wilson interval of n prompts, the one the items above use
    text += f" With n = {n}, one rate near 50% is known to about +/-{50 * (hi - lo):.0f} points."
    return Finding("refusal_loss", title, text, True, items)


# ----------------------------------------------------------------------------------------------- correlates


def _plain(corr: pd.DataFrame) -> pd.DataFrame:
    if "control" not in corr.columns:
        return corr
    return corr[corr["control"].fillna("").astype(str) == ""]


MIN_RUNS_FOR_INTERVAL = 3


def _too_few_runs(r: Mapping) -> bool:
    return _finite(r.get("n_runs")) and int(r["n_runs"]) < MIN_RUNS_FOR_INTERVAL


def _rho_text(r: Mapping) -> str:
    text = f"Spearman rho = {num(r.get('spearman_rho'), 2)}"
    lo, hi = r.get("spearman_ci_low", np.nan), r.get("spearman_ci_high", np.nan)
    if _too_few_runs(r):
        # resampling 2 runs has 3 distinct outcomes: its percentile "interval" says nothing about uncertainty
        text += (
            f" (no interval: {int(r['n_runs'])} runs are too few to resample; {MIN_RUNS_FOR_INTERVAL} needed)"
        )
    elif _finite(lo) and _finite(hi):
        runs = f" from resampling {int(r['n_runs'])} runs" if _finite(r.get("n_runs")) else ""
        text += f" (95% interval {_interval(float(lo), float(hi))}{runs})"
    else:
        text += " (no interval in this table)"
    return text


def strongest_correlate(corr: pd.DataFrame | None, y: str = "refusal_rate") -> Finding:
    """The internal metric whose correlation with ``y`` over all checkpoints is largest in |Spearman rho|."""
    title = "Strongest internal correlate of refusal"
    if corr is None or not len(corr) or not {"x", "y", "group", "spearman_rho"} <= set(corr.columns):
        return Finding(
            "correlate", title, "Not available: no correlations (behaviour was not measured).", False
        )
    plain = _plain(corr)
    c = plain[(plain["y"] == y) & (plain["group"] == "all") & (plain["x"] != "delta_fro_total")]
    c = c[np.isfinite(pd.to_numeric(c["spearman_rho"], errors="coerce").astype(float))]
    if not len(c):
        return Finding("correlate", title, f"Not available: no finite correlation with {y}.", False)
    best = c.loc[c["spearman_rho"].astype(float).abs().idxmax()].to_dict()
    text = (
        f"`{best['x']}` tracks {y} most closely over all checkpoints: {_rho_text(best)}, "
        f"Pearson r = {num(best.get('pearson_r'), 2)}, n = {int(best['n'])} checkpoints."
    )
    lo, hi = best.get("spearman_ci_low", np.nan), best.get("spearman_ci_high", np.nan)
    if not _too_few_runs(best) and _finite(lo) and _finite(hi) and float(lo) <= 0 <= float(hi):
        text += " Its interval includes 0: not distinguishable from no correlation."
    items = []
    if "control" in corr.columns:
        part = corr[
            (corr["x"] == best["x"])
            & (corr["y"] == y)
            & (corr["group"] == "all")
            & (corr["control"].fillna("").astype(str) != "")
        ]
        if len(part):
            p = part.iloc[0].to_dict()
            if _finite(p.get("spearman_rho")):
                items.append(f"with `{p['control']}` (update size) partialled out: {_rho_text(p)}")
            else:
                items.append(
                    f"with `{p['control']}` partialled out: not computable on these {int(p['n'])} points"
                )
    for group, what in (
        ("within_run:all", "within runs (over each run's steps, mean over runs)"),
        ("across_runs:all", "across runs (final checkpoints, one point per run)"),
    ):
        scoped = plain[(plain["x"] == best["x"]) & (plain["y"] == y) & (plain["group"] == group)]
        if len(scoped) and _finite(scoped.iloc[0]["spearman_rho"]):
            r = scoped.iloc[0].to_dict()
            items.append(f"{what}: {_rho_text(r)}, n = {int(r['n'])} checkpoints")
    size = plain[(plain["x"] == "delta_fro_total") & (plain["y"] == y) & (plain["group"] == "all")]
    if len(size):
        items.append(f"update size alone (`delta_fro_total`): {_rho_text(size.iloc[0].to_dict())}")
    return Finding("correlate", title, text, True, tuple(items))


# ----------------------------------------------------------------------------------------------- LoRA vs full


def _end_state(r: Mapping, n: int | None) -> str:
    bits = []
    if _finite(r.get("refusal_rate")):
        rate = float(r["refusal_rate"])
        ci = f" {_interval(*rate_interval(rate, n), 100)}" if n else ""
        bits.append(f"refusal {pct(rate)}{ci}")
    for col, name in (("cos_to_base_at_rl", "cosine to the base direction"), ("delta_fro_total", "||dW||_F")):
        if _finite(r.get(col)):
            bits.append(f"{name} {num(r[col])}")
    if _finite(r.get("chrf")):
        bits.append(f"chrF {float(r['chrf']):.1f}")
    return ", ".join(bits) or "no numbers"


def lora_vs_full(table: pd.DataFrame | None, contrast: pd.DataFrame | None, n: int | None) -> Finding:
    """Full fine-tuning against LoRA/QLoRA at matched learning rate: end-of-training refusal, drift, update size."""
    title = "LoRA vs full fine-tuning"
    if table is None or not len(table) or "method" not in table.columns:
        return Finding("contrast", title, "Not available: no checkpoint table with methods.", False)
    final = final_checkpoints(table)
    methods = set(final["method"].dropna())
    if "full" not in methods or not methods & set(LUMP):
        return Finding(
            "contrast", title, "Not available: the tree lacks full fine-tuning or LoRA/QLoRA runs.", False
        )
    items = []
    lrs = sorted({float(v) for v in pd.to_numeric(final["lr"], errors="coerce").dropna()})
    for lr in lrs:
        at = final[np.isclose(pd.to_numeric(final["lr"], errors="coerce").astype(float), lr)]
        if "full" not in set(at["method"]) or not set(at["method"]) & set(LUMP):
            continue
        parts = [
            f"{r['method']} ({_end_state(r, n)})"
            for r in at.sort_values(["method", "run"]).to_dict("records")
            if r["method"] in ("full", *LUMP)
        ]
        items.append(f"lr {lr:g}, at the last checkpoint: " + "; ".join(parts))
    if not items:
        text = "No learning rate is shared by full fine-tuning and a LoRA/QLoRA run, so there is no matched pair."
    else:
        text = f"At {len(items)} matched learning rate(s), each method's last checkpoint is listed below."
    if contrast is not None and len(contrast):
        text += f" The full contrast (`method_contrast.csv`, {len(contrast)} rows) is tabulated below."
        if {"pairing", "pair", "role"} <= set(contrast.columns):
            try:
                items += [f"method_contrast.csv, {line}" for line in headline(contrast)]
            except (
                KeyError,
                TypeError,
                ValueError,
            ):  # a contrast table of another version: the table still shows
                pass
    else:
        text += " (`method_contrast.csv` is not present: the per-layer contrast is not available.)"
    return Finding("contrast", title, text, bool(items) or contrast is not None, tuple(items))


# ----------------------------------------------------------------------------------------------- prediction


def _leaves(obj: Any, path: str = "") -> list[tuple[str, float]]:
    if isinstance(obj, Mapping):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, f"{path}.{k}" if path else str(k))]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(float(obj)):
        return [(path, float(obj))]
    return []


def _scheme_text(name: str, res: Mapping, baseline: Mapping | None) -> str:
    text = f"{name}: MAE {num(res.get('mae'))}, Spearman {num(res.get('spearman'), 2)}"
    if _finite(res.get("coverage")):
        text += f", interval coverage {pct(float(res['coverage']))}"
    if _finite(res.get("n")):
        text += f" over {int(res['n'])} held-out checkpoints"
    if baseline and _finite(baseline.get("mae")):
        text += f" (weight-size baseline: MAE {num(baseline['mae'])}, Spearman {num(baseline.get('spearman'), 2)})"
    worst = res.get("worst")
    if isinstance(worst, Mapping) and _finite(worst.get("mae")):
        text += f"; worst held out `{worst.get('held_out')}` at MAE {num(worst['mae'])}"
    return text


def prediction(pred: Mapping | None) -> Finding:
    """The held-out scores in ``prediction.json``: the primary model's MAE and Spearman leaving one run out and one
    method out, against the weight-size baseline, and the per-prompt AUROC. Another layout: every MAE, Spearman,
    AUROC it holds, by key path."""
    title = "Predicting refusal without generating"
    if not pred:
        return Finding("prediction", title, "Not available: no prediction.json in this analysis.", False)
    models = pred.get("models") if isinstance(pred.get("models"), Mapping) else None
    primary = pred.get("primary")
    if models and primary in models:
        res = models[primary]
        base = models.get(str(pred.get("baseline") or "")) or {}
        goals = pred.get("goals") or {}
        mae_goal = goals.get("mae_at_most", PREDICTION_TARGETS["mae"][1])
        items = [
            _scheme_text(k, v, base.get(k) if isinstance(base, Mapping) else None)
            + (
                f" (goal <= {mae_goal:g}: {'met' if v['mae'] <= mae_goal else 'not met'})"
                if _finite(v.get("mae"))
                else ""
            )
            for k, v in res.items()
            if isinstance(v, Mapping) and "mae" in v
        ]
        aur = (pred.get("auroc") or {}).get("refusal_score") or {}
        if _finite(aur.get("pooled")):
            goal = goals.get("auroc_at_least", PREDICTION_TARGETS["auroc"][1])
            items.append(
                f"per prompt: AUROC of the refusal score for the prompt's own verdict {num(aur['pooled'])} pooled over "
                f"{aur.get('n_prompts', '?')} prompt evaluations, median per checkpoint "
                f"{num(aur.get('median_per_checkpoint'))} (goal >= {goal:g}: "
                f"{'met' if float(aur['pooled']) >= goal else 'not met'})"
            )
        text = (
            f"Predictor `{primary}` ({', '.join(map(str, res.get('features', []))) or 'features not recorded'}), "
            "fit on some runs and scored on runs (LORO) or methods (LOMO) it did not see."
        )
        if pred.get("fails"):
            text += f" Where it fails: {pred['fails']}"
        return Finding("prediction", title, text, True, tuple(items))
    scores = [(k, v) for k, v in _leaves(pred) if PREDICTION_KEYS.search(k.rsplit(".", 1)[-1])]
    if not scores:
        return Finding(
            "prediction", title, "Not available: prediction.json holds no MAE, Spearman or AUROC.", False
        )
    items = []
    for k, v in scores:
        text = f"{k} = {num(v)}"
        leaf = k.rsplit(".", 1)[-1].lower()
        for name, (op, target) in PREDICTION_TARGETS.items():
            if name in leaf and "baseline" not in k.lower():
                met = v <= target if op == "<=" else v >= target
                text += f" (target {op} {target:g}: {'met' if met else 'not met'})"
        items.append(text)
    text = "Held-out scores of the predictor (fit on some runs, scored on runs it did not see), from prediction.json:"
    return Finding("prediction", title, text, True, tuple(items))


# ----------------------------------------------------------------------------------------------- causal


def causal(table: pd.DataFrame | None) -> Finding:
    """Whether the base direction still matters at the refusal layer at each run's last checkpoint."""
    title = "Does the model still use the direction"
    cols = [f"{m}_at_rl" for m in CAUSAL_METRICS]
    if table is None or not len(table) or not any(c in table.columns for c in cols):
        return Finding(
            "causal", title, "Not available: no causal measures (necessity/sufficiency) recorded.", False
        )
    steps = pd.to_numeric(table["step"], errors="coerce")
    base = table[steps == 0]
    items = []
    for r in final_checkpoints(table).sort_values("run").to_dict("records"):
        b = base[base["run"] == r["run"]]
        bits = []
        for c in cols:
            if c in table.columns and _finite(r.get(c)):
                at_base = f" (base {num(b.iloc[0][c])})" if len(b) and _finite(b.iloc[0][c]) else ""
                lo, hi = (r.get(c.replace("_at_rl", f"_ci_{end}_at_rl")) for end in ("low", "high"))
                ci = f" [{num(lo)}, {num(hi)}]" if _finite(lo) and _finite(hi) else ""
                bits.append(f"{c[: -len('_at_rl')]} {num(r[c])}{ci}{at_base}")
        if bits:
            items.append(
                f"{_run_label(r['run'], r.get('method'), r.get('lr'))} at step {_step(r)}: " + ", ".join(bits)
            )
    text = (
        "Refusal-score change (log-odds) at the refusal layer, last checkpoint against the base: necessity = score drop "
        "when the base (own) direction is ablated on harmful prompts, sufficiency = score rise when the base direction "
        "is added on harmless prompts; brackets: 95% interval over resamples of the held-out prompts."
    )
    return Finding("causal", title, text, bool(items), tuple(items))


def all_findings(
    table: pd.DataFrame | None,
    correlations: pd.DataFrame | None,
    *,
    n: int | None,
    contrast: pd.DataFrame | None = None,
    pred: Mapping | None = None,
) -> list[Finding]:
    """Every finding in report order."""
    return [
        refusal_loss(table, n),
        strongest_correlate(correlations),
        lora_vs_full(table, contrast, n),
        prediction(pred),
        causal(table),
    ]
