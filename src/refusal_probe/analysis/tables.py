"""Tidy tables on disk, and the wide one-row-per-checkpoint table that correlation, plots and report share.

Tidy (long) frames hold one number per row; ``write_table`` fixes their column order and row order so that two
runs over the same inputs produce byte-identical files (diffable, cacheable).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal, overload

import numpy as np
import pandas as pd

from refusal_probe.analysis.readings import COLUMN as READING_COLUMN
from refusal_probe.analysis.readings import with_readings
from refusal_probe.core.errors import UserError, require
from refusal_probe.core.io import atomic_write
from refusal_probe.probe.causal import CAUSAL_METRICS
from refusal_probe.probe.noise import NOISE_DOCS, NOISE_METRICS

TIDY_COLUMNS = ("run", "checkpoint", "method", "lr", "step", "fraction", "layer", "module", "metric", "value")
CHECKPOINT_KEYS = ("run", "checkpoint", "method", "lr", "step", "fraction")
# A checkpoint is (run, checkpoint name): a root adapter or a plain save_pretrained folder has no step.
JOIN_KEYS = ("run", "checkpoint")
# Row order of tidy tables: the checkpoint (run, step, name), then where in the model, then what.
SORT_KEYS = ("run", "step", "checkpoint", "layer", "module", "metric")

CAUSAL_DOCS = {
    "score_harmful": "mean refusal-token log-odds at the last position on held-out harmful prompts",
    "score_harmful_ablate_base": "score_harmful with the base model's direction of this layer ablated everywhere",
    "score_harmful_ablate_own": "score_harmful with this checkpoint's own direction of this layer ablated",
    "score_harmless": "mean refusal-token log-odds on held-out harmless prompts",
    "score_harmless_add_base": "score_harmless with the base direction vector added entering this layer",
    "necessity_base": "score_harmful - score_harmful_ablate_base (refusal the base direction carries)",
    "necessity_own": "score_harmful - score_harmful_ablate_own (refusal the checkpoint's own direction carries)",
    "sufficiency_base": "score_harmless_add_base - score_harmless (refusal the base direction induces)",
    **{
        f"{m}_ci_{end}": f"{end} end of the 95% percentile interval of {m} over paired resamples of the held-out "
        "prompts (--n-boot-prompts, seed 0)"
        for m in ("necessity_base", "necessity_own", "sufficiency_base")
        for end in ("low", "high")
    },
}
# Columns of ``checkpoint_table`` and how each number is computed (the report prints these verbatim).
COLUMN_DOCS: dict[str, str] = {
    "run": "run name (run folder or run.json)",
    "checkpoint": "checkpoint name: base, the checkpoint folder's name, or final for a run's root model",
    "method": "training method from run.json or the checkpoint (full, lora, qlora, dpo; empty = unknown)",
    "lr": "learning rate of the run",
    "step": "optimizer step of the checkpoint (0 = the base model)",
    "fraction": "fraction of the run's training done at this checkpoint (0 = base, 1 = end)",
    "refusal_layer": "layer whose base-model refusal direction was chosen for this run's base",
    "cos_to_base_at_rl": "cosine between this checkpoint's difference-of-means direction and the base model's, "
    "at the refusal layer (1 = unchanged)",
    "proj_gap_at_rl": "mean projection of harmful minus harmless activations on the base model's unit refusal "
    "direction, at the refusal layer (the refusal signal)",
    **{f"{m}_at_rl": f"causal drift at the refusal layer: {doc}" for m, doc in CAUSAL_DOCS.items()},
    READING_COLUMN: "plain-words reading of the causal drift against the run's base (see summary how)",
    **{f"{m}_at_rl": f"noise floor at the refusal layer: {doc}" for m, doc in NOISE_DOCS.items()},
    "mean_cos_to_base": "cos_to_base averaged over all layers (unweighted mean)",
    "delta_fro_total": "||W_ckpt - W_base||_F over all transformer-block weight matrices: sqrt of the sum of "
    "squared per-module delta_fro (0 for the base by definition)",
    "delta_along_refusal_total": "sqrt of the sum over residual-writing modules (o_proj, down_proj) of "
    "||r_hat^T dW||^2: how much the weight change writes along the refusal direction (0 for the base)",
    "refusal_rate": "share of harmful prompts judged refused (see judge signature)",
    "chrf": "sacrebleu chrF of translations against references (see metric signature)",
    "xstest_refusal_rate": "share of XSTest safe prompts refused (over-refusal)",
    "label_refusal": "share of harmful-prompt responses labelled refusal",
    "label_comply": "share of harmful-prompt responses labelled comply",
    "label_echo": "share of harmful-prompt responses labelled echo (repeats or translates the prompt)",
    "label_degenerate": "share of harmful-prompt responses labelled degenerate (empty, repetitive)",
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def canonical_order(df: pd.DataFrame) -> pd.DataFrame:
    """Canonical columns first (those present), extra columns after them in their given order, rows sorted stably."""
    first = [c for c in TIDY_COLUMNS if c in df.columns]
    rest = [c for c in df.columns if c not in TIDY_COLUMNS]
    out = df.loc[:, first + rest].copy()
    for col in ("step", "layer"):
        if col in out.columns and _integral(out[col]):
            out[col] = out[col].astype("Int64")
    keys = [c for c in SORT_KEYS if c in out.columns]
    if keys:
        out = out.sort_values(keys, kind="mergesort", na_position="last")
    return out.reset_index(drop=True)


@overload
def read_table(folder: str | Path, name: str, required: Literal[True]) -> pd.DataFrame: ...


@overload
def read_table(folder: str | Path, name: str, required: bool = False) -> pd.DataFrame | None: ...


def read_table(folder: str | Path, name: str, required: bool = False) -> pd.DataFrame | None:
    """``<name>.csv`` of an analysis folder as analyze wrote it (run, checkpoint and method read as text); None when
    absent, unless ``required``. A missing required or unreadable table is a one-line UserError."""
    path = Path(folder) / f"{name}.csv"
    if not path.is_file():
        if required:
            raise UserError(
                f"{path}: not found; the analysis folder is incomplete, re-run `refusal-probe analyze`"
            )
        return None
    try:
        return pd.read_csv(path, dtype={"run": str, "checkpoint": str, "method": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: cannot read the table ({reason}); re-run `refusal-probe analyze`") from None


def _integral(s: pd.Series) -> bool:
    if not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
        return False
    vals = s.dropna().to_numpy(dtype=np.float64)
    return bool(np.all(np.isfinite(vals)) and np.all(vals == np.round(vals)))


def write_table(df: pd.DataFrame, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``<name>.csv`` and ``<name>.parquet`` atomically, in canonical column and row order."""
    require(bool(_NAME_RE.match(name)), f"table name {name!r}: use letters, digits, '_', '-', '.' only")
    require(
        isinstance(df, pd.DataFrame), f"table {name}: expected a pandas DataFrame, got {type(df).__name__}"
    )
    out = canonical_order(df)
    out_dir = Path(out_dir)
    csv = atomic_write(out_dir / f"{name}.csv", lambda p: out.to_csv(p, index=False))
    parquet = atomic_write(out_dir / f"{name}.parquet", lambda p: out.to_parquet(p, index=False))
    return [csv, parquet]


def _frames(*frames: pd.DataFrame | None) -> list[pd.DataFrame]:
    return [f for f in frames if f is not None and len(f)]


def require_columns(df: pd.DataFrame, what: str, cols: Iterable[str], fix: str | None = None) -> None:
    """One-line UserError naming the ``what`` table's missing columns and ``fix`` (default: the expected ones)."""
    cols = tuple(cols)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UserError(
            f"{what} table lacks column(s) {', '.join(missing)}; {fix or 'expected ' + ', '.join(cols)}"
        )


def _layer_for_runs(runs: Iterable[str], refusal_layer: int | Mapping[str, int] | None) -> dict[str, float]:
    if refusal_layer is None:
        return {r: np.nan for r in runs}
    if isinstance(refusal_layer, Mapping):
        return {r: float(refusal_layer[r]) if refusal_layer.get(r) is not None else np.nan for r in runs}
    return {r: float(refusal_layer) for r in runs}


def _per_checkpoint(s: pd.DataFrame, name: str) -> pd.DataFrame:
    return s.rename(columns={"value": name})[[*JOIN_KEYS, name]]


def checkpoint_meta(c) -> dict:
    """The ``CHECKPOINT_KEYS`` of a tree's checkpoint ``c``, as every tidy row of it carries them (base: step 0)."""
    return {
        "run": c.run,
        "checkpoint": c.name,
        "method": c.method,
        "lr": c.lr,
        "step": 0 if c.kind == "base" else c.step,
        "fraction": c.fraction,
    }


def with_checkpoint(df: pd.DataFrame | None) -> pd.DataFrame | None:
    """``df`` with a ``checkpoint`` column; a table without one (written before names were joined on) is named by
    its step ("base" for step 0, else "step-N")."""
    if df is None or not len(df) or "checkpoint" in df.columns:
        return df

    def name(step) -> str:
        if step is None or (isinstance(step, float) and np.isnan(step)):
            return "final"
        return "base" if float(step) == 0 else f"step-{int(float(step))}"

    return df.assign(checkpoint=[name(s) for s in df["step"]])


def final_checkpoints(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its last checkpoint (largest fraction, then step; a stepless "final" counts as the end),
    never the base. Runs with only a base are left out."""
    if not len(table) or "run" not in table.columns:
        return table.iloc[:0]
    step = pd.to_numeric(table["step"], errors="coerce") if "step" in table.columns else None
    frac = pd.to_numeric(table["fraction"], errors="coerce") if "fraction" in table.columns else None
    key = pd.DataFrame(index=table.index)
    key["frac"] = frac if frac is not None else np.nan
    if "checkpoint" in table.columns:
        key.loc[key["frac"].isna() & (table["checkpoint"] == "final"), "frac"] = 1.0
    key["step"] = step if step is not None else np.nan
    base = step.eq(0) if step is not None else pd.Series(False, index=table.index)
    if "checkpoint" in table.columns:
        base |= table["checkpoint"].eq("base")
    key = key[~base].fillna(-np.inf)
    if not len(key):
        return table.iloc[:0]
    key["run"] = table.loc[key.index, "run"].astype(str)
    last = key.sort_values(["run", "frac", "step"], kind="mergesort").groupby("run").tail(1).index
    return table.loc[sorted(last)]


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Every row of each run's last checkpoint as ``final_checkpoints`` chooses it: for a tidy table (many rows per
    checkpoint, named by run and checkpoint or step) all of that checkpoint's rows."""
    keys = [c for c in ("run", "checkpoint", "step") if c in df.columns]
    if not len(df) or "run" not in keys:
        return df.iloc[:0]
    last = final_checkpoints(df.drop_duplicates(keys)).loc[:, keys]
    return df[pd.MultiIndex.from_frame(df[keys]).isin(pd.MultiIndex.from_frame(last))]


def refusal_layer_by_run(summary: Mapping | None, runs: Iterable[str]) -> dict[str, int | None]:
    """The chosen refusal layer of each run's base, read from the analysis summary (None where it does not say).

    Looks, in order, at ``summary["runs"][run]["refusal_layer"]``, at ``summary["bases"][base]["refusal_layer"]``
    with ``base = summary["runs"][run]["base"]``, at the only base when there is one, then ``summary["refusal_layer"]``.
    """
    summary = summary or {}
    bases = summary_bases(summary)
    run_info = summary.get("runs") or {}
    out: dict[str, int | None] = {}
    for run in runs:
        info = run_info.get(run) if isinstance(run_info, Mapping) else None
        info = info if isinstance(info, Mapping) else {"base": info} if isinstance(info, str) else {}
        layer = info.get("refusal_layer")
        if layer is None and info.get("base") in bases:
            layer = bases[info["base"]].get("refusal_layer")
        if layer is None and len(bases) == 1:
            layer = next(iter(bases.values())).get("refusal_layer")
        if layer is None:
            layer = summary.get("refusal_layer")
        out[run] = int(layer) if layer is not None else None
    return out


def summary_bases(summary: Mapping | None) -> dict[str, dict]:
    """``summary["bases"]`` as {base spec: info dict}, accepting a dict or a list of dicts with "spec"/"model"."""
    raw = (summary or {}).get("bases") or {}
    if isinstance(raw, Mapping):
        return {str(k): dict(v) if isinstance(v, Mapping) else {"value": v} for k, v in raw.items()}
    out: dict[str, dict] = {}
    for item in raw:
        if isinstance(item, Mapping):
            spec = item.get("spec") or item.get("model") or item.get("base") or f"base-{len(out)}"
            out[str(spec)] = dict(item)
        else:
            out[str(item)] = {}
    return out


def checkpoint_table(
    drift: pd.DataFrame | None,
    deltas: pd.DataFrame | None,
    behaviour: pd.DataFrame | None,
    refusal_layer: int | Mapping[str, int] | None,
) -> pd.DataFrame:
    """One wide row per checkpoint (run, checkpoint name) joining drift at the refusal layer, weight-change totals, behaviour.

    ``refusal_layer`` is one layer for every run or a mapping run -> layer (runs over different bases).
    Column meanings are in ``COLUMN_DOCS``. Missing inputs leave their columns out (deltas, behaviour) or NaN.
    """
    drift, deltas, behaviour = with_checkpoint(drift), with_checkpoint(deltas), with_checkpoint(behaviour)
    present = _frames(drift, deltas, behaviour)
    require(bool(present), "nothing to tabulate: the drift, deltas and behaviour tables are all empty")
    for what, df in (("drift", drift), ("deltas", deltas)):
        if df is not None and len(df):
            require_columns(df, what, (*CHECKPOINT_KEYS, "layer", "metric", "value"))
    if behaviour is not None and len(behaviour):
        require_columns(behaviour, "behaviour", (*CHECKPOINT_KEYS, "metric", "value"))

    ids = pd.concat([f.loc[:, list(CHECKPOINT_KEYS)] for f in present], ignore_index=True)
    ids["method"] = ids["method"].astype(object).where(ids["method"].notna(), None)
    table = (
        ids.groupby(list(JOIN_KEYS), dropna=False, sort=True)
        .agg(
            method=("method", "first"),
            lr=("lr", "first"),
            step=("step", "first"),
            fraction=("fraction", "first"),
        )
        .reset_index()
    )
    table = table.loc[:, list(CHECKPOINT_KEYS)]
    layers = _layer_for_runs(table["run"].unique(), refusal_layer)
    table["refusal_layer"] = table["run"].map(layers).astype(float)

    if drift is not None and len(drift):
        d = drift.assign(layer=drift["layer"].astype(float), value=drift["value"].astype(np.float64))
        for run, layer in layers.items():
            have = d.loc[d["run"] == run, "layer"].unique()
            if np.isfinite(layer) and len(have) and layer not in have:
                raise UserError(
                    f"refusal layer {int(layer)} for run {run} is not among the drift layers "
                    f"{int(np.nanmin(have))}..{int(np.nanmax(have))}; pass a layer that was probed"
                )
        at_rl = d[d["layer"] == d["run"].map(layers)]
        # causal drift (probe/causal.py) and noise floors (probe/noise.py) when analyze measured them
        measured = set(at_rl["metric"])
        extra = [m for m in (*CAUSAL_METRICS, *NOISE_METRICS) if m in measured]
        for metric in ("cos_to_base", "proj_gap", *extra):
            rows = at_rl[at_rl["metric"] == metric].groupby(list(JOIN_KEYS), dropna=False)["value"].mean()
            table = table.merge(_per_checkpoint(rows.reset_index(), f"{metric}_at_rl"), how="left")
        cos = d[d["metric"] == "cos_to_base"].groupby(list(JOIN_KEYS), dropna=False)["value"].mean()
        table = table.merge(_per_checkpoint(cos.reset_index(), "mean_cos_to_base"), how="left")

    if deltas is not None and len(deltas):
        w = deltas[deltas["layer"].astype(float) >= 0]
        for metric, col in (
            ("delta_fro", "delta_fro_total"),
            ("delta_along_refusal", "delta_along_refusal_total"),
        ):
            sel = w[w["metric"] == metric]
            if not len(sel):
                continue
            sq = (
                (sel["value"].astype(np.float64) ** 2)
                .groupby([sel[k] for k in JOIN_KEYS], dropna=False)
                .sum()
            )
            table = table.merge(_per_checkpoint(np.sqrt(sq).reset_index(), col), how="left")
            base = table["step"] == 0
            table.loc[base, col] = table.loc[base, col].fillna(0.0)

    if behaviour is not None and len(behaviour):
        b = behaviour.loc[:, [*JOIN_KEYS, "metric", "value"]].drop_duplicates()
        dup = b.duplicated([*JOIN_KEYS, "metric"], keep=False)
        if dup.any():
            r = b[dup].iloc[0]
            raise UserError(
                f"behaviour table has conflicting values for run {r['run']} checkpoint {r['checkpoint']} metric "
                f"{r['metric']}; re-run `refusal-probe eval` or remove the stale rows"
            )
        wide = b.set_index([*JOIN_KEYS, "metric"])["value"].astype(np.float64).unstack("metric").reset_index()
        wide.columns.name = None
        order = [m for m in ("refusal_rate", "chrf", "xstest_refusal_rate") if m in wide.columns]
        order += sorted(c for c in wide.columns if c not in (*JOIN_KEYS, *order))
        table = table.merge(wide.loc[:, [*JOIN_KEYS, *order]], how="left", on=list(JOIN_KEYS))

    table = with_readings(table)
    return table.sort_values(["run", "step"], kind="mergesort", na_position="last").reset_index(drop=True)
