"""Correlation of drift / weight change with behaviour, over checkpoints.

Each checkpoint is one point. The base model is step 0 of every run, so it appears once per run in the tables;
it is counted once per distinct base here (step-0 rows with identical measurements are merged), otherwise n and
the p-values would be inflated by copies of the same model.

Checkpoints of one run are not independent either: each row also carries a 95% interval from a bootstrap that
resamples whole runs (``uncertainty.run_bootstrap``), and rows with ``control`` = delta_fro_total give the partial
correlation of each internal metric with refusal rate once the size of the weight update is partialled out.

Three scopes (column ``scope``): ``pooled`` (every checkpoint, the rows this table always had, groups "all" and
each method), ``within_run`` (over the steps of each run, the per-run correlation averaged over runs: does the
metric track behaviour as one run trains?) and ``across_runs`` (the final checkpoint of each run, one point per
run: do runs that drift more end up refusing less?). Non-pooled groups are named ``<scope>:<group>`` (e.g.
``within_run:all``, ``across_runs:full``), so a reader that selects group "all" still gets the pooled rows only.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from refusal_probe.analysis import uncertainty
from refusal_probe.analysis.tables import final_checkpoints
from refusal_probe.core.errors import UserError, require

DEFAULT_X = (
    "cos_to_base_at_rl",
    "proj_gap_at_rl",
    "mean_cos_to_base",
    "delta_fro_total",
    "delta_along_refusal_total",
    "score_harmful_at_rl",
    "necessity_base_at_rl",
    "necessity_own_at_rl",
    "sufficiency_base_at_rl",
)
DEFAULT_Y = ("refusal_rate", "chrf")
MIN_POINTS = 3
EXACT_MAX_N = 8  # exact Spearman p-values up to 8! = 40,320 pairings
RESULT_COLUMNS = ("x", "y", "group", "n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p")
CI_COLUMNS = ("pearson_ci_low", "pearson_ci_high", "spearman_ci_low", "spearman_ci_high", "n_runs")
# partial correlations: each internal metric with refusal rate, the size of the weight update partialled out
PARTIAL_Y = "refusal_rate"
PARTIAL_Z = "delta_fro_total"
SCOPES = ("pooled", "within_run", "across_runs")
TABLE_COLUMNS = (*RESULT_COLUMNS, *CI_COLUMNS, "control", "scope")
CORRELATIONS_HOW = (
    "one row per (x, y, group): Pearson r and Spearman rho over checkpoints (the base once per distinct base), "
    "p-values treating checkpoints as independent; pearson_ci_low/high and spearman_ci_low/high are the 2.5 and "
    f"97.5 percentiles over {uncertainty.N_BOOT} bootstrap resamples (seed {uncertainty.SEED}) that draw whole "
    "runs with replacement (all checkpoints of a drawn run together, a shared base once), n_runs the runs "
    "resampled, NaN with fewer than 2 runs. Rows with control = "
    f"{PARTIAL_Z} are partial correlations of x with {PARTIAL_Y} controlling for {PARTIAL_Z} (x and y each "
    "residualised on it by least squares, Pearson on values, Spearman on ranks; p not computed), with their own "
    "run-bootstrap interval. scope = pooled: those rows over every checkpoint (groups all and each method). "
    "scope = within_run (groups within_run:all, within_run:<method>): for each run, Pearson r and Spearman rho "
    "over its own checkpoints (its base, step 0, included; a run needs 3 points and a non-constant x and y); "
    "pearson_r and spearman_rho are the unweighted means over the runs where rho is defined, n_runs those runs, "
    "n their checkpoints, no p-values; the interval is the percentile interval of that mean over "
    f"{uncertainty.N_BOOT} resamples of those runs with replacement (seed {uncertainty.SEED}). scope = "
    "across_runs (groups across_runs:all, across_runs:<method>): the final checkpoint of each run only (largest "
    "fraction, then step; never the base), one point per run, p-values as for pooled, the run-bootstrap interval "
    "and, for refusal rate, the partial correlation on the same points. Method groups need 3 points (within_run: "
    "1 run)."
)


def pair_stats(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Pearson r and Spearman rho with two-sided p-values over the points where both x and y are finite.

    Pearson p is scipy's t-test. Spearman p is exact (all n! pairings) for n <= ``EXACT_MAX_N``: the t
    approximation scipy uses says p = 0 for a perfect rank order of 3 points, where the exact answer is 1/3.
    Fewer than 3 points, or a constant input, gives NaN (no correlation is defined), never an error.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out = {
        "n": int(ok.sum()),
        "pearson_r": np.nan,
        "pearson_p": np.nan,
        "spearman_rho": np.nan,
        "spearman_p": np.nan,
    }
    if len(x) < MIN_POINTS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    with warnings.catch_warnings():
        # scipy warns on near-constant input; the NaN it returns is what we report
        warnings.simplefilter("ignore")
        pr = stats.pearsonr(x, y)
        sr = stats.spearmanr(x, y)
    out.update(
        pearson_r=float(pr.statistic),
        pearson_p=float(pr.pvalue),
        spearman_rho=float(sr.statistic),
        spearman_p=float(sr.pvalue) if len(x) > EXACT_MAX_N else exact_spearman_p(x, y),
    )
    return out


def exact_spearman_p(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided permutation p-value of Spearman rho: the share of all n! pairings with |rho| >= the observed one."""
    rx = stats.rankdata(x)
    ry = stats.rankdata(y)
    n = len(rx)
    require(n <= EXACT_MAX_N, f"exact Spearman p-value needs n <= {EXACT_MAX_N}, got {n}")
    perms = _permutations(n)
    dx = rx - rx.mean()
    dy = ry[perms] - ry.mean()
    rho = (dy @ dx) / np.sqrt((dx @ dx) * (dy * dy).sum(axis=1))
    observed = abs(float(rho[0]))  # permutation 0 is the identity
    return float(np.mean(np.abs(rho) >= observed - 1e-12))


@functools.lru_cache(maxsize=EXACT_MAX_N)
def _permutations(n: int) -> np.ndarray:
    """All n! orderings of range(n), identity first (built once per n: per-layer tables ask for them often)."""
    out = np.array(list(itertools.permutations(range(n))), dtype=np.intp)
    out.flags.writeable = False
    return out


def dedupe_base(df: pd.DataFrame, value_cols: Sequence[str]) -> pd.DataFrame:
    """Keep one step-0 (base) row per distinct set of measured values; later checkpoints are untouched."""
    if "step" not in df.columns:
        return df
    base = df["step"] == 0
    cols = list(value_cols)
    kept = df[base].round({c: 12 for c in cols}).drop_duplicates(subset=cols).index
    return df[~base | df.index.isin(kept)]


def _method_group_rows(table: pd.DataFrame, method: str, value_cols: Sequence[str]) -> pd.DataFrame:
    """A method's checkpoints plus its runs' base rows (bases carry the run's method in the tables)."""
    runs = table.loc[table["method"] == method, "run"].unique()
    return dedupe_base(table[table["run"].isin(runs)], value_cols)


def correlate(
    checkpoint_table: pd.DataFrame,
    x_cols: Sequence[str] | None = None,
    y_cols: Sequence[str] | None = None,
    scopes: Sequence[str] = SCOPES,
) -> pd.DataFrame:
    """Pearson and Spearman correlation for every (x, y) pair, for all runs and per method, in each of ``scopes``.

    The "all" group of each scope is always reported (NaN statistics below 3 points); a method's group only when
    it has >= 3 points (within_run: one run with a defined rho). Default columns: ``DEFAULT_X`` x ``DEFAULT_Y``,
    those present in the table.
    """
    cols = set(checkpoint_table.columns)
    if x_cols is None:
        x_cols = [c for c in DEFAULT_X if c in cols]
    if y_cols is None:
        y_cols = [c for c in DEFAULT_Y if c in cols]
    for c in (*x_cols, *y_cols):
        if c not in cols:
            raise UserError(
                f"cannot correlate column {c!r}: not in the checkpoint table ({', '.join(sorted(cols))})"
            )
    unknown = [s for s in scopes if s not in SCOPES]
    require(not unknown, f"unknown correlation scope(s) {unknown}; choose from {', '.join(SCOPES)}")
    finals = final_checkpoints(checkpoint_table)
    rows = []
    for x in x_cols:
        for y in y_cols:
            if x != y:
                rows += pair_rows(checkpoint_table, x, y, scopes, finals)
    if PARTIAL_Y in y_cols and PARTIAL_Z in cols:
        xs = [x for x in x_cols if x not in (PARTIAL_Y, PARTIAL_Z)]
        if "pooled" in scopes:
            rows += _partial_rows(checkpoint_table, xs)
        if "across_runs" in scopes:
            rows += _partial_rows(finals, xs, scope="across_runs")
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _methods(table: pd.DataFrame) -> list[str]:
    if "method" not in table.columns:
        return []
    return sorted(str(m) for m in table["method"].dropna().unique() if m)


def _group_name(scope: str, group: str) -> str:
    return group if scope == "pooled" else f"{scope}:{group}"


def pair_rows(
    table: pd.DataFrame, x: str, y: str, scopes: Sequence[str] = SCOPES, finals: pd.DataFrame | None = None
) -> list[dict]:
    """The rows of one (x, y) pair: every scope, group "all" then each method (see ``correlate``)."""
    rows = []
    for scope in scopes:
        src = table
        if scope == "across_runs":
            src = final_checkpoints(table) if finals is None else finals
        for group in ["all", *_methods(src)]:
            gsrc = _group_source(src, group)
            if scope == "within_run":
                w = uncertainty.within_run(gsrc[x], gsrc[y], gsrc["run"]) if "run" in gsrc.columns else None
                if w is None or (group != "all" and w["n_runs"] < 1):
                    continue
                s = {"n": w["n"], "pearson_r": w["pearson_r"], "pearson_p": np.nan}
                s |= {"spearman_rho": w["spearman_rho"], "spearman_p": np.nan}
                ci = {c: w[c] for c in CI_COLUMNS}
            else:
                df = dedupe_base(gsrc, [x, y])
                s = pair_stats(df[x].to_numpy(dtype=np.float64), df[y].to_numpy(dtype=np.float64))
                if group != "all" and s["n"] < MIN_POINTS:
                    continue
                ci = _interval(gsrc, x, y)
            name = _group_name(scope, group)
            rows.append({"x": x, "y": y, "group": name, **s, **ci, "control": "", "scope": scope})
    return rows


def _group_source(table: pd.DataFrame, group: str) -> pd.DataFrame:
    """The rows a group's bootstrap resamples: every run ("all") or a method's runs, base rows not yet deduped."""
    if group == "all" or "method" not in table.columns:
        return table
    runs = table.loc[table["method"] == group, "run"].unique()
    return table[table["run"].isin(runs)]


def _interval(df: pd.DataFrame, x: str, y: str, z: str | None = None) -> dict:
    """Run-bootstrap interval columns for one group (NaN without a run column)."""
    if "run" not in df.columns:
        return {c: np.nan for c in CI_COLUMNS[:4]} | {"n_runs": 0}
    is_base = df["step"].eq(0).to_numpy() if "step" in df.columns else np.zeros(len(df), dtype=bool)
    res = uncertainty.run_bootstrap(
        df[x].to_numpy(dtype=np.float64),
        df[y].to_numpy(dtype=np.float64),
        df["run"].astype(str).to_numpy(),
        is_base,
        None if z is None else df[z].to_numpy(dtype=np.float64),
    )
    return {c: res[c] for c in CI_COLUMNS}


def _partial_rows(table: pd.DataFrame, x_cols: Sequence[str], scope: str = "pooled") -> list[dict]:
    """Partial correlation of each x with PARTIAL_Y given PARTIAL_Z, for all runs and per method (>= 4 points)."""
    y, z = PARTIAL_Y, PARTIAL_Z
    groups = ["all", *_methods(table)]
    rows = []
    for x in x_cols:
        for group in groups:
            src = _group_source(table, group)
            df = dedupe_base(src, [x, y, z])
            p = uncertainty.partial_corr(df[x].to_numpy(), df[y].to_numpy(), df[z].to_numpy())
            if group != "all" and p["n"] < uncertainty.MIN_POINTS_PARTIAL:
                continue
            rows.append(
                {
                    "x": x,
                    "y": y,
                    "group": _group_name(scope, group),
                    "n": p["n"],
                    "pearson_r": p["pearson_r"],
                    "pearson_p": np.nan,
                    "spearman_rho": p["spearman_rho"],
                    "spearman_p": np.nan,
                    **_interval(src, x, y, z),
                    "control": z,
                    "scope": scope,
                }
            )
    return rows


PER_LAYER_COLUMNS = (
    "layer",
    "group",
    "n",
    "pearson_r",
    "pearson_p",
    "spearman_rho",
    "spearman_p",
    *CI_COLUMNS,
    "chosen",
    "scope",
)


def per_layer_correlation(
    drift: pd.DataFrame,
    behaviour: pd.DataFrame | None,
    metric: str = "cos_to_base",
    y: str = "refusal_rate",
    refusal_layer: int | Mapping[str, int] | None = None,
    scopes: Sequence[str] = ("pooled",),
) -> pd.DataFrame:
    """For each layer, how well the drift ``metric`` at that layer tracks behaviour ``y`` across checkpoints.

    Returns ``PER_LAYER_COLUMNS``: per layer and group (as in ``correlate``: "all" and each method with >= 3
    points, in each of ``scopes``) the correlations with their run-bootstrap intervals; ``chosen`` marks the
    refusal layer of the group's runs (``refusal_layer``: one layer, or a layer per run). Sorted by scope, group
    then layer. The layer with the largest |spearman_rho| in group "all" is the one whose drift tracks behaviour
    best. Empty when there is no behaviour.
    """
    cols = list(PER_LAYER_COLUMNS)
    if behaviour is None or not len(behaviour):
        return pd.DataFrame(columns=cols)
    require(
        metric in set(drift["metric"]),
        f"drift table has no metric {metric!r}; have {sorted(set(drift['metric']))}",
    )
    b = behaviour[behaviour["metric"] == y]
    if not len(b):
        return pd.DataFrame(columns=cols)
    # a checkpoint is (run, checkpoint name) where both tables name them (stepless checkpoints join too)
    keys = (
        ["run", "checkpoint"]
        if "checkpoint" in b.columns and "checkpoint" in drift.columns
        else ["run", "step"]
    )
    b = b.loc[:, [*keys, "value"]].drop_duplicates(keys).rename(columns={"value": y})
    meta = [c for c in ("run", "method", "step", "fraction", "checkpoint") if c in drift.columns]
    d = drift[drift["metric"] == metric].loc[:, list(dict.fromkeys([*meta, *keys, "layer", "value"]))]
    joined = d.rename(columns={"value": metric}).merge(b, on=keys, how="inner")
    rows = []
    for layer, at_layer in joined.groupby("layer", sort=True):
        at_layer = at_layer.reset_index(drop=True)
        for r in pair_rows(at_layer, metric, y, scopes):
            group = r["group"].split(":", 1)[-1]
            runs = _group_source(at_layer, group)["run"].astype(str).unique()
            r.update(layer=int(layer), chosen=_is_chosen(int(layer), runs, refusal_layer))
            rows.append(r)
    out = pd.DataFrame(rows, columns=cols)
    out["_s"] = out["scope"].map({s: i for i, s in enumerate(SCOPES)})
    out["_g"] = ~out["group"].isin([_group_name(s, "all") for s in SCOPES])
    out = out.sort_values(["_s", "_g", "group", "layer"], kind="mergesort").drop(columns=["_s", "_g"])
    return out.reset_index(drop=True)


def _is_chosen(layer: int, runs: Sequence[str], refusal_layer: int | Mapping[str, int] | None) -> bool:
    if refusal_layer is None:
        return False
    if isinstance(refusal_layer, Mapping):
        return layer in {refusal_layer.get(r) for r in runs}
    return layer == int(refusal_layer)


PER_LAYER_METRICS = ("cos_to_base", "proj_gap")


def pooled_layers(
    per_layers: pd.DataFrame, metric: str = "cos_to_base", y: str = "refusal_rate"
) -> pd.DataFrame:
    """The pooled-scope rows of one metric x y from ``per_layer_correlations``, as ``per_layer_correlation``
    returns them (no metric/y columns)."""
    if per_layers is None or not len(per_layers):
        return pd.DataFrame(columns=list(PER_LAYER_COLUMNS))
    sel = (per_layers["metric"] == metric) & (per_layers["y"] == y) & (per_layers["scope"] == "pooled")
    return per_layers.loc[sel, list(PER_LAYER_COLUMNS)].reset_index(drop=True)


def per_layer_correlations(
    drift: pd.DataFrame,
    behaviour: pd.DataFrame | None,
    metrics: Sequence[str] = PER_LAYER_METRICS,
    ys: Sequence[str] = ("refusal_rate",),
    refusal_layer: int | Mapping[str, int] | None = None,
    scopes: Sequence[str] = SCOPES,
) -> pd.DataFrame:
    """``per_layer_correlation`` for every drift metric x behaviour pair present, every scope, in one table with
    ``metric`` and ``y`` columns (per_layer_correlations.csv)."""
    frames = []
    have = set(drift["metric"]) if len(drift) else set()
    have_y = set(behaviour["metric"]) if behaviour is not None and len(behaviour) else set()
    for metric in [m for m in metrics if m in have]:
        for y in [v for v in ys if v in have_y]:
            pl = per_layer_correlation(drift, behaviour, metric, y, refusal_layer, scopes)
            if len(pl):
                frames.append(pl.assign(metric=metric, y=y))
    if not frames:
        return pd.DataFrame(columns=["metric", "y", *PER_LAYER_COLUMNS])
    out = pd.concat(frames, ignore_index=True)
    return out.loc[:, ["metric", "y", *PER_LAYER_COLUMNS]]


def best_layer(per_layer: pd.DataFrame, group: str = "all") -> dict | None:
    """The row (as a dict) with the largest |spearman_rho| in ``group``; None when no layer has a finite rho."""
    if per_layer is None or not len(per_layer):
        return None
    g = per_layer[(per_layer["group"] == group) & np.isfinite(per_layer["spearman_rho"].astype(float))]
    if not len(g):
        return None
    return g.loc[g["spearman_rho"].astype(float).abs().idxmax()].to_dict()


def strongest(
    correlations: pd.DataFrame, k: int = 10, min_n: int = MIN_POINTS, scope: str | None = "pooled"
) -> pd.DataFrame:
    """The k plain (not partial) pairs with the largest |spearman_rho| (finite, n >= min_n), strongest first, larger n
    first on ties; of one ``scope`` (None: every scope)."""
    if correlations is None or not len(correlations):
        return pd.DataFrame(columns=list(RESULT_COLUMNS))
    if scope is not None and "scope" in correlations.columns:
        correlations = correlations[correlations["scope"].fillna("pooled") == scope]
    if "control" in correlations.columns:  # plain correlations only: a partial one is a different question
        correlations = correlations[correlations["control"].fillna("") == ""]
    c = correlations[(correlations["n"] >= min_n) & np.isfinite(correlations["spearman_rho"].astype(float))]
    # ties in |rho| (e.g. several perfect rank orders) go to the pair backed by more checkpoints
    key = pd.DataFrame({"abs": c["spearman_rho"].astype(float).abs().round(10), "n": c["n"]})
    order = key.sort_values(["abs", "n"], ascending=False, kind="mergesort").index
    return c.loc[order].head(k).reset_index(drop=True)
