"""Correlation of drift / weight change with behaviour, over checkpoints.

Each checkpoint is one point. The base model is step 0 of every run, so it appears once per run in the tables;
it is counted once per distinct base here (step-0 rows with identical measurements are merged), otherwise n and
the p-values would be inflated by copies of the same model.

Checkpoints of one run are not independent either: each row also carries a 95% interval from a bootstrap that
resamples whole runs (``uncertainty.run_bootstrap``), and rows with ``control`` = delta_fro_total give the partial
correlation of each internal metric with refusal rate once the size of the weight update is partialled out.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from refusal_probe.analysis import uncertainty
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
TABLE_COLUMNS = (*RESULT_COLUMNS, *CI_COLUMNS, "control")
CORRELATIONS_HOW = (
    "one row per (x, y, group): Pearson r and Spearman rho over checkpoints (the base once per distinct base), "
    "p-values treating checkpoints as independent; pearson_ci_low/high and spearman_ci_low/high are the 2.5 and "
    f"97.5 percentiles over {uncertainty.N_BOOT} bootstrap resamples (seed {uncertainty.SEED}) that draw whole "
    "runs with replacement (all checkpoints of a drawn run together, a shared base once), n_runs the runs "
    "resampled, NaN with fewer than 2 runs. Rows with control = "
    f"{PARTIAL_Z} are partial correlations of x with {PARTIAL_Y} controlling for {PARTIAL_Z} (x and y each "
    "residualised on it by least squares, Pearson on values, Spearman on ranks; p not computed), with their own "
    "run-bootstrap interval."
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
    perms = np.array(list(itertools.permutations(range(n))), dtype=np.intp)
    dx = rx - rx.mean()
    dy = ry[perms] - ry.mean()
    rho = (dy @ dx) / np.sqrt((dx @ dx) * (dy * dy).sum(axis=1))
    observed = abs(float(rho[0]))  # permutation 0 is the identity
    return float(np.mean(np.abs(rho) >= observed - 1e-12))


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
) -> pd.DataFrame:
    """Pearson and Spearman correlation for every (x, y) pair over checkpoints, for all runs and per method.

    The "all" group is always reported (NaN statistics below 3 points); a method's group only when it has >= 3
    points. Default columns: ``DEFAULT_X`` x ``DEFAULT_Y``, those present in the table.
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
    rows = []
    for x in x_cols:
        for y in y_cols:
            if x == y:
                continue
            all_rows = dedupe_base(checkpoint_table, [x, y])
            groups = [("all", all_rows)]
            if "method" in cols:
                for method in sorted(m for m in checkpoint_table["method"].dropna().unique() if m):
                    groups.append((str(method), _method_group_rows(checkpoint_table, method, [x, y])))
            for group, df in groups:
                s = pair_stats(df[x].to_numpy(dtype=np.float64), df[y].to_numpy(dtype=np.float64))
                if group != "all" and s["n"] < MIN_POINTS:
                    continue
                ci = _interval(_group_source(checkpoint_table, group), x, y)
                rows.append({"x": x, "y": y, "group": group, **s, **ci, "control": ""})
    if PARTIAL_Y in y_cols and PARTIAL_Z in cols:
        rows += _partial_rows(checkpoint_table, [x for x in x_cols if x not in (PARTIAL_Y, PARTIAL_Z)])
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _group_source(table: pd.DataFrame, group: str) -> pd.DataFrame:
    """The rows a group's bootstrap resamples: every run ("all") or a method's runs, base rows not yet deduped."""
    if group == "all":
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


def _partial_rows(table: pd.DataFrame, x_cols: Sequence[str]) -> list[dict]:
    """Partial correlation of each x with PARTIAL_Y given PARTIAL_Z, for all runs and per method (>= 4 points)."""
    y, z = PARTIAL_Y, PARTIAL_Z
    groups = ["all"]
    if "method" in table.columns:
        groups += sorted(str(m) for m in table["method"].dropna().unique() if m)
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
                    "group": group,
                    "n": p["n"],
                    "pearson_r": p["pearson_r"],
                    "pearson_p": np.nan,
                    "spearman_rho": p["spearman_rho"],
                    "spearman_p": np.nan,
                    **_interval(src, x, y, z),
                    "control": z,
                }
            )
    return rows


def per_layer_correlation(
    drift: pd.DataFrame,
    behaviour: pd.DataFrame | None,
    metric: str = "cos_to_base",
    y: str = "refusal_rate",
) -> pd.DataFrame:
    """For each layer, how well the drift ``metric`` at that layer tracks behaviour ``y`` across checkpoints.

    Returns columns layer, group, n, pearson_r, pearson_p, spearman_rho, spearman_p (group "all" and each method
    with >= 3 points), sorted by group then layer. The layer with the largest |spearman_rho| in group "all" is the
    one whose drift tracks behaviour best. Empty when there is no behaviour.
    """
    cols = ["layer", "group", "n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p"]
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
    d = drift[drift["metric"] == metric].loc[
        :, list(dict.fromkeys(["run", "method", "step", *keys, "layer", "value"]))
    ]
    joined = d.rename(columns={"value": metric}).merge(b, on=keys, how="inner")
    rows = []
    for layer, at_layer in joined.groupby("layer", sort=True):
        at_layer = at_layer.reset_index(drop=True)
        groups = [("all", dedupe_base(at_layer, [metric, y]))]
        for method in sorted(m for m in at_layer["method"].dropna().unique() if m):
            groups.append((str(method), _method_group_rows(at_layer, method, [metric, y])))
        for group, df in groups:
            s = pair_stats(df[metric].to_numpy(), df[y].to_numpy())
            if group != "all" and s["n"] < MIN_POINTS:
                continue
            rows.append({"layer": int(layer), "group": group, **s})
    out = pd.DataFrame(rows, columns=cols)
    out["_g"] = out["group"] != "all"
    out = out.sort_values(["_g", "group", "layer"], kind="mergesort").drop(columns="_g")
    return out.reset_index(drop=True)


def best_layer(per_layer: pd.DataFrame, group: str = "all") -> dict | None:
    """The row (as a dict) with the largest |spearman_rho| in ``group``; None when no layer has a finite rho."""
    if per_layer is None or not len(per_layer):
        return None
    g = per_layer[(per_layer["group"] == group) & np.isfinite(per_layer["spearman_rho"].astype(float))]
    if not len(g):
        return None
    return g.loc[g["spearman_rho"].astype(float).abs().idxmax()].to_dict()


def strongest(correlations: pd.DataFrame, k: int = 10, min_n: int = MIN_POINTS) -> pd.DataFrame:
    """The k plain (not partial) pairs with the largest |spearman_rho| (finite, n >= min_n), strongest first, larger n
    first on ties."""
    if correlations is None or not len(correlations):
        return pd.DataFrame(columns=list(RESULT_COLUMNS))
    if "control" in correlations.columns:  # plain correlations only: a partial one is a different question
        correlations = correlations[correlations["control"].fillna("") == ""]
    c = correlations[(correlations["n"] >= min_n) & np.isfinite(correlations["spearman_rho"].astype(float))]
    # ties in |rho| (e.g. several perfect rank orders) go to the pair backed by more checkpoints
    key = pd.DataFrame({"abs": c["spearman_rho"].astype(float).abs().round(10), "n": c["n"]})
    order = key.sort_values(["abs", "n"], ascending=False, kind="mergesort").index
    return c.loc[order].head(k).reset_index(drop=True)
