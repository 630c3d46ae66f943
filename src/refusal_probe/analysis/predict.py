"""Predicting each checkpoint's keyword refusal rate from its internals, without generating text, scored only on runs
the fit never saw: leave one run out (LORO) and leave one method out (LOMO), against a baseline that knows only the
size of the weight update (delta_fro_total). Each held-out prediction carries a split-conformal interval whose
half-width is a quantile of out-of-sample residuals inside the training runs (a nested leave-one-group-out), so the
held-out run never sets its own interval. Per prompt: how well a prompt's own refusal score or projection ranks
whether that prompt was refused (AUROC, no fit at all).

Everything here is pure (tables in, tables and dicts out); ``write_predictions`` writes the two files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

TARGET = "refusal_rate"
BASELINE = "baseline"
ALPHA = 0.1  # 90% prediction intervals
SCHEMES = {"LORO": "run", "LOMO": "method"}
GOALS = {"mae": 0.05, "auroc": 0.9}
PREDICTION_COLUMNS = (
    "run",
    "checkpoint",
    "method",
    "scheme",
    "held_out",
    "model",
    "observed",
    "predicted",
    "low",
    "high",
)


# ------------------------------------------------------------------------------------------------ the pieces


def fit_linear(x: np.ndarray, y: np.ndarray, ridge: float = 0.0) -> np.ndarray:
    """Least squares ``y ~ b0 + x @ b`` (``ridge`` >= 0 penalises b, not b0); returns [b0, b...]."""
    x = np.asarray(x, dtype=np.float64).reshape(len(y), -1)
    y = np.asarray(y, dtype=np.float64)
    a = np.column_stack([np.ones(len(y)), x])
    if ridge > 0:
        pen = np.sqrt(ridge) * np.eye(a.shape[1])[1:]
        a, y = np.vstack([a, pen]), np.concatenate([y, np.zeros(len(pen))])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return coef


def apply_linear(coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(-1, len(coef) - 1)
    return coef[0] + x @ coef[1:]


def fit_threshold(scores: Sequence[float], refused: Sequence[bool]) -> float:
    """The cut t maximising the accuracy of ``score > t`` as a refusal verdict (midpoints between sorted scores; the
    lowest such cut on ties). All one class: a cut below or above every score."""
    s = np.asarray(scores, dtype=np.float64)
    r = np.asarray(refused, dtype=bool)
    u = np.unique(s)
    cuts = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]])
    acc = [np.mean((s > t) == r) for t in cuts]
    return float(cuts[int(np.argmax(acc))])


def fit_logistic(scores: Sequence[float], refused: Sequence[bool]) -> tuple[float, float]:
    """(a, b) of P(refused) = sigmoid(a + b * score), maximum likelihood (a tiny L2 keeps separable data finite);
    one class only: b = 0 and a the log-odds of its clipped rate."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    r = np.asarray(refused, dtype=bool)
    if r.all() or not r.any():
        p = min(max(float(r.mean()), 1e-3), 1 - 1e-3)
        return math.log(p / (1 - p)), 0.0
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression(C=1e4, max_iter=1000).fit(s, r)
    return float(m.intercept_[0]), float(m.coef_[0, 0])


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (ties count half); NaN when one class is absent."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(s)
    y, s = y[ok], s[ok]
    if y.all() or not y.any():
        return math.nan
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def label_noise_mae(rates: Sequence[float], n: int) -> float:
    """The MAE a perfect predictor of each checkpoint's true refusal rate would still score against rates judged on
    n prompts: the mean over checkpoints of E|Binomial(n, p) / n - p|, p = the observed rate (a plug-in estimate)."""
    from scipy import stats

    p = np.asarray([r for r in rates if math.isfinite(r)], dtype=np.float64)
    if n < 1 or not len(p):
        return math.nan
    k = np.arange(n + 1)
    pmf = stats.binom.pmf(k[None, :], n, p[:, None])  # [checkpoints, n + 1]
    return float((pmf * np.abs(k[None, :] / n - p[:, None])).sum(axis=1).mean())


def conformal_halfwidth(residuals: Sequence[float], alpha: float = ALPHA) -> float:
    """Split-conformal half-width: the ceil((n + 1)(1 - alpha))-th smallest |residual|; inf when n is too small."""
    r = np.sort(np.abs(np.asarray(residuals, dtype=np.float64)))
    r = r[np.isfinite(r)]
    k = math.ceil((len(r) + 1) * (1 - alpha))
    return float(r[k - 1]) if 0 < k <= len(r) else math.inf


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


# ------------------------------------------------------------------------------------------------ the models


@dataclass(frozen=True)
class Model:
    """A predictor of the refusal rate: ``fit(train rows, train prompts)`` -> ``predict(test rows, test prompts)``."""

    name: str
    features: tuple[str, ...]
    how: str
    fit: Callable[[pd.DataFrame, pd.DataFrame], Callable[[pd.DataFrame, pd.DataFrame], np.ndarray]]
    per_prompt: bool = False


def linear_model(name: str, features: Sequence[str], ridge: float = 1e-6) -> Model:
    feats = tuple(features)

    def fit(train: pd.DataFrame, _p: pd.DataFrame):
        coef = fit_linear(train[list(feats)].to_numpy(), train[TARGET].to_numpy(), ridge)
        return lambda test, _tp: np.clip(apply_linear(coef, test[list(feats)].to_numpy()), 0.0, 1.0)

    how = f"least squares of refusal_rate on {', '.join(feats)} (+ intercept, ridge {ridge:g}), clipped to [0, 1]"
    return Model(name, feats, how, fit)


def _prompts_of(rows: pd.DataFrame, prompts: pd.DataFrame) -> pd.DataFrame:
    keys = rows[["run", "checkpoint"]].drop_duplicates()
    return prompts.merge(keys, on=["run", "checkpoint"], how="inner")


def _rate_per_row(rows: pd.DataFrame, prompts: pd.DataFrame, values: np.ndarray) -> np.ndarray:
    """Mean of a per-prompt value over each row's checkpoint's prompts (NaN for a checkpoint without prompts)."""
    mean = prompts.assign(_v=values).groupby(["run", "checkpoint"])["_v"].mean()
    idx = pd.MultiIndex.from_frame(rows[["run", "checkpoint"]])
    return mean.reindex(idx).to_numpy(dtype=np.float64)


def threshold_model() -> Model:
    def fit(train: pd.DataFrame, prompts: pd.DataFrame):
        p = _prompts_of(train, prompts)
        t = fit_threshold(p["refusal_score"], p["refused"].astype(bool))

        def predict(test, tp):
            q = _prompts_of(test, tp)
            return _rate_per_row(test, q, (q["refusal_score"].to_numpy() > t).astype(float))

        return predict

    how = (
        "fraction of the checkpoint's AdvBench prompts whose refusal_score exceeds a cut fit on the training runs' "
        "prompts (the cut maximising per-prompt accuracy of score > cut against the eval's verdicts)"
    )
    return Model("prompt_threshold", ("refusal_score",), how, fit, per_prompt=True)


def logistic_model() -> Model:
    def fit(train: pd.DataFrame, prompts: pd.DataFrame):
        p = _prompts_of(train, prompts)
        a, b = fit_logistic(p["refusal_score"], p["refused"].astype(bool))

        def predict(test, tp):
            q = _prompts_of(test, tp)
            return _rate_per_row(test, q, sigmoid(a + b * q["refusal_score"].to_numpy()))

        return predict

    how = (
        "mean over the checkpoint's AdvBench prompts of sigmoid(a + b * refusal_score), a and b a logistic fit of "
        "the eval's per-prompt verdicts on the training runs' prompts"
    )
    return Model("prompt_logistic", ("refusal_score",), how, fit, per_prompt=True)


def models_for(table: pd.DataFrame, prompts: pd.DataFrame | None) -> list[Model]:
    """Every model these tables allow, in a fixed order declared before anything is scored."""
    out = [linear_model(BASELINE, ["delta_fro_total"])] if "delta_fro_total" in table else []
    if "proj_gap_at_rl" in table:
        out.append(linear_model("proj_gap", ["proj_gap_at_rl"]))
    internals = [c for c in ("proj_gap_at_rl", "cos_to_base_at_rl", "score_harmful_at_rl") if c in table]
    if prompts is not None and len(prompts):
        internals.append("mean_refusal_score")
    if len(internals) > 1:
        out.append(linear_model("internals", internals))
    if prompts is not None and len(prompts):
        out += [threshold_model(), logistic_model()]
    return out


def primary_model(models: Sequence[Model]) -> str | None:
    """The one model the headline reports, chosen by what data exist (never by held-out scores)."""
    names = [m.name for m in models]
    for name in ("prompt_logistic", "internals", "proj_gap"):
        if name in names:
            return name
    return None


# ------------------------------------------------------------------------------------------------ held out


def evaluation_rows(table: pd.DataFrame, prompts: pd.DataFrame | None) -> pd.DataFrame:
    """Fine-tuned checkpoints with an observed refusal rate (the base rows, identical across runs, are left out)."""
    df = table.copy()
    if "checkpoint" not in df:
        df["checkpoint"] = [
            "base" if float(s) == 0 else f"step-{int(s)}" for s in pd.to_numeric(df["step"], errors="coerce")
        ]
    base = df["checkpoint"].astype(str).eq("base")
    df = df[~base & pd.to_numeric(df.get(TARGET), errors="coerce").notna()].copy()
    if prompts is not None and len(prompts):
        mean = prompts.groupby(["run", "checkpoint"])["refusal_score"].mean().rename("mean_refusal_score")
        df = df.merge(mean.reset_index(), on=["run", "checkpoint"], how="left")
    df["method"] = df["method"].fillna("").astype(str)
    return df.reset_index(drop=True)


def held_out(rows: pd.DataFrame, prompts: pd.DataFrame, model: Model, group: str, alpha: float = ALPHA):
    """Leave-one-``group``-out predictions of ``model`` with split-conformal intervals from nested residuals."""
    cols = [*model.features] if not model.per_prompt else []
    usable = rows.dropna(subset=[c for c in cols if c in rows]) if cols else rows
    if model.per_prompt:
        have = prompts[["run", "checkpoint"]].drop_duplicates()
        usable = usable.merge(have, on=["run", "checkpoint"], how="inner")
    groups = list(dict.fromkeys(usable[group]))
    out = []
    for g in groups:
        train, test = usable[usable[group] != g], usable[usable[group] == g]
        if train[group].nunique() < 2:  # the nested residuals need two training groups
            continue
        resid = []
        for h in dict.fromkeys(train[group]):
            inner, val = train[train[group] != h], train[train[group] == h]
            resid += list(val[TARGET].to_numpy() - model.fit(inner, prompts)(val, prompts))
        q = conformal_halfwidth(resid, alpha)
        pred = model.fit(train, prompts)(test, prompts)
        out.append(
            pd.DataFrame(
                {
                    "run": test["run"].to_numpy(),
                    "checkpoint": test["checkpoint"].to_numpy(),
                    "method": test["method"].to_numpy(),
                    "held_out": g,
                    "model": model.name,
                    "observed": test[TARGET].to_numpy(dtype=np.float64),
                    "predicted": pred,
                    "low": np.clip(pred - q, 0.0, 1.0),
                    "high": np.clip(pred + q, 0.0, 1.0),
                }
            )
        )
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=PREDICTION_COLUMNS)


def score(pred: pd.DataFrame) -> dict[str, Any]:
    """MAE, Spearman, interval coverage and width of held-out predictions, and the worst held-out group."""
    p = pred[np.isfinite(pred["predicted"].to_numpy(dtype=np.float64))]
    if not len(p):
        return {"n": 0}
    err = (p["observed"] - p["predicted"]).abs()
    by = err.groupby(p["held_out"]).mean()
    inside = (p["observed"] >= p["low"] - 1e-12) & (p["observed"] <= p["high"] + 1e-12)
    return {
        "n": len(p),
        "n_groups": int(p["held_out"].nunique()),
        "mae": float(err.mean()),
        "spearman": spearman(p["observed"], p["predicted"]),
        "coverage": float(inside.mean()),
        "mean_width": float((p["high"] - p["low"]).mean()),
        "mae_by_held_out": {str(k): float(v) for k, v in by.items()},
        "worst": {"held_out": str(by.idxmax()), "mae": float(by.max())},
    }


def prompt_auroc(prompts: pd.DataFrame | None) -> dict[str, Any]:
    """AUROC of refusal_score and of projection for each prompt's refused verdict: pooled, and per checkpoint."""
    if prompts is None or not len(prompts):
        return {}
    out: dict[str, Any] = {}
    for col in ("refusal_score", "projection"):
        per = []
        for (run, ck), g in prompts.groupby(["run", "checkpoint"], sort=True):
            per.append(
                {
                    "run": run,
                    "checkpoint": ck,
                    "n": len(g),
                    "n_refused": int(g["refused"].astype(bool).sum()),
                    "auroc": auroc(g[col], g["refused"].astype(bool)),
                }
            )
        vals = [r["auroc"] for r in per if math.isfinite(r["auroc"])]
        out[col] = {
            "pooled": auroc(prompts[col], prompts["refused"].astype(bool)),
            "n_prompts": len(prompts),
            "median_per_checkpoint": float(np.median(vals)) if vals else math.nan,
            "n_checkpoints_with_both_classes": len(vals),
            "per_checkpoint": per,
        }
    return out


HOW = (
    "Rows: every fine-tuned checkpoint with a keyword refusal rate (base rows left out: they are the same model in "
    "every run). LORO: for each run, every model is fit on the other runs' checkpoints (and, per-prompt models, "
    "their AdvBench prompts) and predicts the held-out run's checkpoints; LOMO: the same holding out all runs of "
    "one method. MAE and Spearman are over all held-out predictions pooled. Interval: split-conformal at 1 - alpha; "
    "its half-width is the ceil((n+1)(1-alpha))-th smallest absolute residual of a nested leave-one-group-out "
    "inside the training groups (the held-out group never sets its own interval); coverage is the fraction of "
    "held-out observations inside, approximate because checkpoints of one run are not exchangeable. AUROC: "
    "sklearn roc_auc_score of a prompt's refusal_score (or projection) against the eval's keyword verdict for that "
    "prompt, no fit: pooled over every checkpoint's prompts and per checkpoint where both verdicts occur."
)

ROWS_HOW = (
    "predictions.csv: one row per held-out prediction: scheme (LORO or LOMO), held_out (the run or method left out), "
    "model, observed and predicted refusal_rate of the checkpoint, low/high its split-conformal interval (see "
    "prediction)"
)


def predict_all(
    table: pd.DataFrame,
    prompts: pd.DataFrame | None = None,
    alpha: float = ALPHA,
    n_judged: int | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(predictions table, prediction.json dict) from the checkpoints table and the optional per-prompt table;
    ``n_judged``: AdvBench prompts behind each refusal rate, for the label-noise floor of the MAE."""
    prompts = prompts if prompts is not None and len(prompts) else None
    rows = evaluation_rows(table, prompts)
    pp = prompts if prompts is not None else pd.DataFrame(columns=["run", "checkpoint", "refusal_score"])
    models = models_for(rows, prompts)
    preds: list[pd.DataFrame] = []
    results: dict[str, dict[str, Any]] = {}
    for m in models:
        results[m.name] = {"features": list(m.features), "how": m.how}
        for scheme, group in SCHEMES.items():
            p = held_out(rows, pp, m, group, alpha).assign(scheme=scheme)
            preds.append(p)
            results[m.name][scheme] = score(p)
    pred = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame(columns=PREDICTION_COLUMNS)
    pred = pred.loc[:, list(PREDICTION_COLUMNS)]
    primary = primary_model(models)
    aur = prompt_auroc(prompts)
    report = {
        "format": "refusal-probe/prediction/1",
        "target": "keyword refusal rate of each fine-tuned checkpoint (eval's refusal_rate)",
        "primary": primary,
        "baseline": BASELINE if BASELINE in results else None,
        "alpha": alpha,
        "n": {
            "checkpoints": len(rows),
            "runs": int(rows["run"].nunique()),
            "methods": int(rows["method"].nunique()),
            "prompts": 0 if prompts is None else len(prompts),
        },
        "goals": {"mae_at_most": GOALS["mae"], "auroc_at_least": GOALS["auroc"]},
        "label_noise": {
            "n_judged": n_judged,
            "mae_floor": None if not n_judged else label_noise_mae(rows[TARGET].tolist(), n_judged),
            "how": "mean over the checkpoints of E|Binomial(n, p)/n - p| at p = the observed rate: the MAE that even "
            "a perfect predictor of the true rate scores against rates judged on n prompts",
        },
        "models": results,
        "auroc": aur,
        "how": HOW,
    }
    report["met"] = _met(report)
    report["fails"] = where_it_fails(report)
    return pred, report


def _met(report: dict[str, Any]) -> dict[str, bool | None]:
    res = report["models"].get(report["primary"] or "", {})
    met: dict[str, bool | None] = {}
    for scheme in SCHEMES:
        mae = res.get(scheme, {}).get("mae")
        met[f"mae_{scheme}"] = None if mae is None else bool(mae <= GOALS["mae"])
    pooled = report["auroc"].get("refusal_score", {}).get("pooled")
    met["auroc"] = None if pooled is None or not math.isfinite(pooled) else bool(pooled >= GOALS["auroc"])
    return met


def where_it_fails(report: dict[str, Any]) -> str:
    """One plain sentence on where the primary predictor misses, from the held-out numbers."""
    name = report["primary"]
    if name is None:
        return "no internal feature to predict from: the checkpoints table has no drift columns"
    res = report["models"][name]
    parts = []
    for scheme in SCHEMES:
        s = res.get(scheme, {})
        if not s.get("n"):
            parts.append(f"{scheme}: too few groups to hold one out")
            continue
        base = report["models"].get(BASELINE, {}).get(scheme, {}).get("mae")
        vs = f" (weight-size baseline {base:.3f})" if base is not None else ""
        ok = "meets" if s["mae"] <= GOALS["mae"] else "misses"
        parts.append(
            f"{scheme} MAE {s['mae']:.3f}{vs} {ok} the {GOALS['mae']} goal, worst held out "
            f"{s['worst']['held_out']} at {s['worst']['mae']:.3f}"
        )
    noise = report.get("label_noise") or {}
    if noise.get("mae_floor") is not None and math.isfinite(noise["mae_floor"]):
        parts.append(
            f"label noise alone costs MAE {noise['mae_floor']:.3f} at n = {noise['n_judged']} judged prompts "
            "(a perfect predictor of the true rate would score that)"
        )
    aur = report["auroc"].get("refusal_score")
    if not aur:
        parts.append("no per-prompt data, so the per-prompt AUROC and the prompt models are not measured")
    elif not math.isfinite(aur["pooled"]):
        parts.append("per-prompt AUROC not defined: every prompt got the same verdict")
    else:
        parts.append(f"per-prompt AUROC of the refusal score {aur['pooled']:.3f} pooled")
    return f"{name}: " + "; ".join(parts) + "."


def write_predictions(
    table: pd.DataFrame, prompts: pd.DataFrame | None, out: str | Path, n_judged: int | None = None
) -> list[Path]:
    """predictions.csv/.parquet (when a group can be held out) and prediction.json in ``out``; nothing when no row
    has an observed refusal rate. One run alone still gets prediction.json: its per-prompt AUROC needs no fit."""
    from refusal_probe.analysis.tables import write_table
    from refusal_probe.core.io import write_json

    if TARGET not in table or not len(evaluation_rows(table, None)):
        return []
    pred, report = predict_all(table, prompts, n_judged=n_judged)
    written = write_table(pred, out, "predictions") if len(pred) else []
    written.append(write_json(Path(out) / "prediction.json", report))
    return written
