"""LoRA vs full fine-tuning (and QLoRA, DPO): why did one method keep its refusals where another lost them?

Pure functions over analyze's tables (the checkpoints table of ``tables.checkpoint_table``, the tidy drift and
weight-delta tables); no model is loaded. Each checkpoint gets a profile (where in depth its refusal direction
drifted, how large and how concentrated its weight update is, how much of the residual-writing update points
along the refusal direction, and any causal ``*_at_rl`` columns), then checkpoints of other methods are paired
with full fine-tuning two ways:

- ``matched_lr``: each run's final checkpoint against the final checkpoint of the full run at the same lr;
- ``matched_chrf``: every trained checkpoint against the full checkpoint whose chrF is nearest (``chrf_gap`` says
  how near: a pair with a large gap is not matched on the task);
- ``matched_update``: the same with the nearest total update size ``delta_fro_total`` (``update_ratio``): does
  an update of the same size move the direction as much?

Concentration is measured on update energy, per-layer ``e_l = sum over modules of ||dW||_F^2``: squared norms
add across layers and modules (``delta_fro_total^2 = sum_l e_l``), so shares of energy sum to 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from refusal_probe.analysis.tables import final_checkpoints, require_columns

FULL = "full"
ADAPTERS = ("lora", "qlora")  # the adapter methods the findings and figures set beside full fine-tuning
TOP_K = 3
# Module kinds of Llama-style blocks, in block order; other module names keep their last path component.
MODULE_KINDS = ("q", "k", "v", "o", "gate", "up", "down")
MLP_KINDS = ("gate", "up", "down")
WRITERS = {"o": "o_proj", "down": "down_proj"}
# Columns of checkpoints.csv carried into the contrast as they are.
_CARRIED = ("refusal_rate", "chrf", "delta_fro_total")

CONTRAST_DOCS: dict[str, str] = {
    "pairing": "matched_lr (final checkpoints, same lr), matched_chrf (the full checkpoint with nearest chrF) or "
    "matched_update (the full checkpoint with nearest delta_fro_total, by ratio)",
    "pair": "id of the pair: '<run>@<step> vs <full run>@<step>'",
    "role": "method (the LoRA/QLoRA/DPO side) or full (its full fine-tuning partner)",
    "run, checkpoint, method, lr, step, fraction": "the checkpoint this row describes",
    "chrf_gap": "chrF of the method side minus chrF of the full side (same on both rows of a pair)",
    "update_ratio": "delta_fro_total of the full side / that of the method side (same on both rows of a pair)",
    "refusal_rate, chrf": "behaviour of this checkpoint (from checkpoints.csv)",
    "refusal_drop": "refusal rate of the run's base (step 0) minus this checkpoint's (positive = refusal lost)",
    "cos_to_base_at_rl": "cosine to the base direction at the chosen refusal layer",
    "drift_min_layer, drift_min_cos": "layer where cos_to_base is lowest, and that cosine",
    "drift_centre": "depth-weighted centre of drift: sum_l l (1 - cos_l) / sum_l (1 - cos_l) (NaN: no drift)",
    "drift_centre_frac": "drift_centre / last layer (0 = first layer, 1 = last)",
    "drift_mean": "mean over layers of 1 - cos_to_base",
    "drift_per_update": "(1 - cos_to_base_at_rl) / delta_fro_total: drift at the refusal layer per unit of update",
    "delta_fro_total": "||W_ckpt - W_base||_F over all block weights (from checkpoints.csv)",
    "top<k>_layer_share": "share of update energy (sum of ||dW||_F^2) in the k layers that moved most",
    "layer_gini": "Gini index of per-layer update energy (0 = every layer alike, (n-1)/n = one layer only)",
    "layer_pr": "participation ratio of per-layer energy, (sum e)^2 / sum e^2: effective number of layers",
    "layer_pr_frac": "layer_pr / number of layers (1 = spread evenly, 1/n = one layer)",
    "module_gini, module_pr": "the same over module kinds q/k/v/o/gate/up/down (energy summed over layers)",
    "share_<kind>": "share of update energy in module kind <kind> (q, k, v, o, gate, up, down)",
    "share_mlp": "share_gate + share_up + share_down: the MLP's part of the update energy",
    "along_<o|down>": "||r_hat^T dW|| / ||dW||_F pooled over layers (root-sum-square of each) for o_proj / "
    "down_proj: the fraction of the residual-writing update along the base refusal direction (r_hat = the base's "
    "chosen unit direction, for every block's writes)",
    "along_writers": "the same pooled over o_proj and down_proj",
    "along_upstream": "along_writers over blocks before the refusal layer (those writing the residual it reads)",
    "along_chance": "1/sqrt(d_model): expected fraction for a direction with no relation to the update "
    "(E||r^T dW||^2 = ||dW||_F^2 / d_model for a uniformly random unit r)",
    "along_vs_chance": "along_writers / along_chance (1 = as aligned as a random direction)",
    "*_at_rl": "every other <metric>_at_rl column of checkpoints.csv (causal measures when present), as is",
}


# ----------------------------------------------------------------------------------------------- math


def gini(values: Sequence[float] | np.ndarray) -> float:
    """Gini index of non-negative values: mean absolute difference / (2 mean); NaN when all are 0 or none."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if (x < 0).any():
        raise ValueError("gini: values must be non-negative")
    if not len(x) or x.sum() <= 0:
        return math.nan
    diff = np.abs(x[:, None] - x[None, :]).sum()
    return float(diff / (2.0 * len(x) ** 2 * x.mean()))


def participation_ratio(values: Sequence[float] | np.ndarray) -> float:
    """(sum x)^2 / sum x^2: how many equal parts the mass is spread over (1 .. n); NaN when all are 0."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    sq = float((x**2).sum())
    return float(x.sum() ** 2 / sq) if sq > 0 else math.nan


def top_k_share(values: Sequence[float] | np.ndarray, k: int) -> float:
    """Share of the total held by the k largest values; NaN when the total is 0."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    total = float(x.sum())
    if total <= 0:
        return math.nan
    return float(np.sort(x)[::-1][:k].sum() / total)


def drift_profile(layers: Sequence[float], cos: Sequence[float]) -> dict[str, float]:
    """Where in depth a direction drifted: lowest-cos layer and its cos, depth-weighted centre of 1 - cos, mean."""
    lay = np.asarray(layers, dtype=np.float64)
    c = np.asarray(cos, dtype=np.float64)
    ok = np.isfinite(lay) & np.isfinite(c)
    lay, c = lay[ok], c[ok]
    nan = {"drift_min_layer": math.nan, "drift_min_cos": math.nan, "drift_centre": math.nan}
    if not len(c):
        return {**nan, "drift_centre_frac": math.nan, "drift_mean": math.nan}
    i = int(np.argmin(c))
    w = np.clip(1.0 - c, 0.0, None)
    centre = float((lay * w).sum() / w.sum()) if w.sum() > 0 else math.nan
    last = float(lay.max())
    return {
        "drift_min_layer": float(lay[i]),
        "drift_min_cos": float(c[i]),
        "drift_centre": centre,
        "drift_centre_frac": centre / last if last > 0 else math.nan,
        "drift_mean": float(w.mean()),
    }


def along_fraction(along: Sequence[float], fro: Sequence[float]) -> float:
    """sqrt(sum along^2) / sqrt(sum fro^2): the pooled fraction of several updates that lies along one direction."""
    a = np.asarray(along, dtype=np.float64)
    f = np.asarray(fro, dtype=np.float64)
    den = float(np.nansum(f**2))
    return math.sqrt(float(np.nansum(a**2)) / den) if den > 0 else math.nan


def module_kind(module: str) -> str:
    """q/k/v/o/gate/up/down for Llama-style module paths (``self_attn.q_proj``), else the last path component."""
    last = str(module).rsplit(".", 1)[-1]
    stem = last[: -len("_proj")] if last.endswith("_proj") else last
    return stem if stem in MODULE_KINDS else last


# ----------------------------------------------------------------------------------------------- per checkpoint


def _keys(*frames: pd.DataFrame | None) -> list[str]:
    """Join on (run, checkpoint) when every table names checkpoints, else on (run, step) (older checkpoints.csv)."""
    present = [f for f in frames if f is not None and len(f)]
    return ["run", "checkpoint"] if all("checkpoint" in f.columns for f in present) else ["run", "step"]


def _need(df: pd.DataFrame, what: str, cols: Sequence[str]) -> None:
    require_columns(df, what, cols, "re-run `refusal-probe analyze`")


def profiles(
    checkpoints: pd.DataFrame,
    drift: pd.DataFrame | None,
    deltas: pd.DataFrame | None,
    d_model: int | Mapping[str, int] | None = None,
    k: int = TOP_K,
) -> pd.DataFrame:
    """One row per checkpoint of ``checkpoints`` with the drift, update-size and along-refusal columns added.

    ``d_model`` (one width, or run -> width) gives the chance level of the along fractions; None leaves it NaN.
    """
    _need(checkpoints, "checkpoints", ("run", "method", "lr", "step"))
    keys = _keys(checkpoints, drift, deltas)
    out = checkpoints.copy()
    base = out[out["step"] == 0].groupby("run")["refusal_rate"].first() if "refusal_rate" in out else None
    out["refusal_drop"] = (
        out["run"].map(base) - out["refusal_rate"]
        if base is not None
        else pd.Series(math.nan, index=out.index)
    )
    extra: dict[tuple, dict[str, float]] = {tuple(r): {} for r in out[keys].itertuples(index=False)}

    if drift is not None and len(drift):
        _need(drift, "drift", (*keys, "layer", "metric", "value"))
        cos = drift[drift["metric"] == "cos_to_base"]
        for key, g in cos.groupby(keys, dropna=False, sort=False):
            if key in extra:
                extra[key].update(drift_profile(g["layer"].astype(float), g["value"].astype(float)))

    if deltas is not None and len(deltas):
        _need(deltas, "weight_deltas", (*keys, "layer", "module", "metric", "value"))
        w = deltas[pd.to_numeric(deltas["layer"]) >= 0]
        fro = w[w["metric"] == "delta_fro"].assign(
            kind=lambda f: f["module"].map(module_kind), sq=lambda f: f["value"].astype(np.float64) ** 2
        )
        all_layers = sorted(pd.to_numeric(fro["layer"]).unique())
        kinds = [m for m in MODULE_KINDS if m in set(fro["kind"])]
        kinds += sorted(set(fro["kind"]) - set(kinds))
        along = w[w["metric"] == "delta_along_refusal"]
        along_by = {key: g for key, g in along.groupby(keys, dropna=False, sort=False)}
        layer_of = out.set_index(keys)["refusal_layer"] if "refusal_layer" in out else None
        for key, g in fro.groupby(keys, dropna=False, sort=False):
            if key not in extra:
                continue
            rl = float(layer_of.get(key, math.nan)) if layer_of is not None else math.nan
            extra[key].update(_update_profile(g, along_by.get(key), all_layers, kinds, k, rl))

    cols = pd.DataFrame([{**dict(zip(keys, key, strict=True)), **v} for key, v in extra.items()])
    out = out.merge(cols, on=keys, how="left") if len(cols.columns) > len(keys) else out
    width = out["run"].map(d_model) if isinstance(d_model, Mapping) else d_model
    chance = 1.0 / np.sqrt(pd.to_numeric(pd.Series(width, index=out.index), errors="coerce").astype(float))
    out["along_chance"] = chance
    if {"cos_to_base_at_rl", "delta_fro_total"} <= set(out.columns):
        size = out["delta_fro_total"].astype(float)
        out["drift_per_update"] = (1.0 - out["cos_to_base_at_rl"].astype(float)) / size.where(size > 0)
    if "along_writers" in out:
        out["along_vs_chance"] = out["along_writers"] / chance
    return out


def _update_profile(
    fro: pd.DataFrame, along: pd.DataFrame | None, layers: list, kinds: list[str], k: int, rl: float
) -> dict[str, float]:
    """Size and concentration of one checkpoint's update; modules with no row (LoRA's untouched ones) count 0."""
    per_layer = fro.groupby(pd.to_numeric(fro["layer"]))["sq"].sum().reindex(layers, fill_value=0.0)
    per_kind = fro.groupby("kind")["sq"].sum().reindex(kinds, fill_value=0.0)
    total = float(per_kind.sum())
    row: dict[str, float] = {
        f"top{k}_layer_share": top_k_share(per_layer, k),
        "layer_gini": gini(per_layer),
        "layer_pr": participation_ratio(per_layer),
        "module_gini": gini(per_kind),
        "module_pr": participation_ratio(per_kind),
    }
    row["layer_pr_frac"] = row["layer_pr"] / len(layers) if layers else math.nan
    for kind in kinds:
        row[f"share_{kind}"] = float(per_kind[kind]) / total if total > 0 else math.nan
    mlp = [k for k in MLP_KINDS if k in kinds]
    if mlp:
        row["share_mlp"] = sum(row[f"share_{k}"] for k in mlp)
    writers = fro[fro["module"].astype(str).str.rsplit(".", n=1).str[-1].isin(WRITERS.values())]
    a = along if along is not None else fro.iloc[:0]
    merged = writers.merge(
        a.loc[:, ["layer", "module", "value"]].rename(columns={"value": "along"}),
        on=["layer", "module"],
        how="left",
    )
    for name, suffix in (*WRITERS.items(), ("writers", "")):
        sel = merged[merged["module"].astype(str).str.endswith(suffix)] if suffix else merged
        row[f"along_{name}"] = (
            along_fraction(sel["along"], sel["value"]) if sel["along"].notna().any() else math.nan
        )
    up = merged[pd.to_numeric(merged["layer"]) < rl] if np.isfinite(rl) else merged.iloc[:0]
    row["along_upstream"] = (
        along_fraction(up["along"], up["value"]) if up["along"].notna().any() else math.nan
    )
    return row


# ----------------------------------------------------------------------------------------------- pairing


def _lr(value) -> float:
    """A learning rate as a float; NaN when the checkpoint recorded none (a lone adapter), which matches nothing."""
    return float("nan") if value is None or pd.isna(value) else float(value)


def _lrs(rows: pd.DataFrame) -> np.ndarray:
    return pd.to_numeric(rows["lr"], errors="coerce").to_numpy(dtype=float)


def matched_lr_pairs(p: pd.DataFrame) -> list[tuple[int, int]]:
    """(method row, full row) index pairs: each non-full run's final checkpoint vs the full run's at the same lr."""
    final = final_checkpoints(p)
    full = final[final["method"] == FULL]
    pairs = []
    others = final[final["method"].notna() & (final["method"] != FULL)]
    for i, row in others.sort_values(["lr", "run"]).iterrows():
        partner = full[np.isclose(_lrs(full), _lr(row["lr"]), rtol=1e-9, atol=0.0)]
        if len(partner):
            pairs.append((i, partner.sort_values("run").index[0]))
    return pairs


def nearest_full_pairs(p: pd.DataFrame, column: str, log: bool = False) -> list[tuple[int, int]]:
    """(method row, full row) pairs: every trained non-full checkpoint vs the trained full checkpoint nearest in
    ``column`` (on a log scale with ``log``). Ties go to the full run at the same lr, then the smaller step, then
    the run name."""
    if column not in p:
        return []
    value = pd.to_numeric(p[column], errors="coerce").astype(float)
    if log:
        value = np.log(value.where(value > 0))
    trained = p[(p["step"] != 0) & value.notna()]
    full = trained[trained["method"] == FULL]
    if not len(full):
        return []
    pairs = []
    others = trained[trained["method"].notna() & (trained["method"] != FULL)]
    for i, row in others.sort_values(["run", "step"]).iterrows():
        gap = (value[full.index] - value[i]).abs()
        other_lr = ~np.isclose(_lrs(full), _lr(row["lr"]), rtol=1e-9, atol=0.0)
        order = pd.DataFrame({"gap": gap, "other_lr": other_lr, "step": full["step"], "run": full["run"]})
        pairs.append((i, order.sort_values(["gap", "other_lr", "step", "run"], kind="mergesort").index[0]))
    return pairs


def matched_chrf_pairs(p: pd.DataFrame) -> list[tuple[int, int]]:
    """Every trained non-full checkpoint vs the trained full checkpoint of nearest chrF (same task skill)."""
    return nearest_full_pairs(p, "chrf")


def matched_update_pairs(p: pd.DataFrame) -> list[tuple[int, int]]:
    """Every trained non-full checkpoint vs the trained full checkpoint whose ||dW||_F is nearest (by ratio)."""
    return nearest_full_pairs(p, "delta_fro_total", log=True)


def _ratio(a, b) -> float:
    a, b = float(a) if pd.notna(a) else math.nan, float(b) if pd.notna(b) else math.nan
    return a / b if b > 0 else math.nan


def _pair_id(row: pd.Series) -> str:
    return f"{row['run']}@{int(row['step']) if pd.notna(row['step']) else 'final'}"


def method_contrast(
    checkpoints: pd.DataFrame,
    drift: pd.DataFrame | None,
    deltas: pd.DataFrame | None,
    d_model: int | Mapping[str, int] | None = None,
    k: int = TOP_K,
) -> pd.DataFrame:
    """Two rows per pair (role method, role full) for both pairings; column meanings in ``CONTRAST_DOCS``.

    Empty when there is no full fine-tuning run or nothing to compare with it.
    """
    p = profiles(checkpoints, drift, deltas, d_model, k)
    rows = []
    pairings = (
        ("matched_lr", matched_lr_pairs(p)),
        ("matched_chrf", matched_chrf_pairs(p)),
        ("matched_update", matched_update_pairs(p)),
    )
    for pairing, pairs in pairings:
        for i, j in pairs:
            m, f = p.loc[i], p.loc[j]
            gap = float(m["chrf"]) - float(f["chrf"]) if "chrf" in p else math.nan
            ratio = _ratio(f.get("delta_fro_total"), m.get("delta_fro_total"))
            pid = f"{_pair_id(m)} vs {_pair_id(f)}"
            for role, r in (("method", m), ("full", f)):
                rows.append(
                    {"pairing": pairing, "pair": pid, "role": role, "chrf_gap": gap, "update_ratio": ratio}
                    | r.to_dict()
                )
    if not rows:
        return pd.DataFrame(columns=["pairing", "pair", "role"])
    out = pd.DataFrame(rows)
    first = ["pairing", "pair", "role", "run", "checkpoint", "method", "lr", "step", "fraction", "chrf_gap"]
    first.append("update_ratio")
    first = [c for c in first if c in out.columns]
    order = [c for c in _column_order(out.columns) if c not in first]
    return out.loc[:, first + order].reset_index(drop=True)


def _column_order(cols) -> list[str]:
    lead = [*_CARRIED, "refusal_drop", "refusal_layer", "cos_to_base_at_rl"]
    groups = [c for c in lead if c in cols]
    groups += [c for c in cols if str(c).startswith("drift_")]
    groups += [c for c in cols if str(c).endswith("_layer_share")]
    groups += [
        c for c in ("layer_gini", "layer_pr", "layer_pr_frac", "module_gini", "module_pr") if c in cols
    ]
    groups += [c for c in cols if str(c).startswith("share_")]
    groups += [c for c in cols if str(c).startswith("along_")]
    groups += [c for c in cols if str(c).endswith("_at_rl") and c not in groups]
    return groups + [c for c in cols if c not in groups]


def contrast_layers(
    pairs: pd.DataFrame, drift: pd.DataFrame | None, deltas: pd.DataFrame | None
) -> pd.DataFrame:
    """Per-layer curves of the matched-lr checkpoints for the figure: cos_to_base, ||dW_l||_F and the along fraction.

    Tidy rows {run, method, lr, step, layer, metric, value}; metric in cos_to_base, delta_fro_layer, along_layer.
    """
    sel = pairs[pairs["pairing"] == "matched_lr"].drop_duplicates(["run", "step"])
    keys = ["run", "step"]
    want = sel.loc[:, ["run", "method", "lr", "step"]]
    parts = []
    if drift is not None and len(drift):
        c = drift[drift["metric"] == "cos_to_base"].loc[:, [*keys, "layer", "value"]]
        parts.append(want.merge(c, on=keys).assign(metric="cos_to_base"))
    if deltas is not None and len(deltas):
        w = deltas[pd.to_numeric(deltas["layer"]) >= 0]
        w = want.merge(w.drop(columns=["method", "lr"], errors="ignore"), on=keys)
        fro = w[w["metric"] == "delta_fro"]
        sq = (fro["value"].astype(np.float64) ** 2).groupby([fro[k] for k in [*keys, "layer"]]).sum()
        size = np.sqrt(sq).rename("value").reset_index()
        parts.append(want.merge(size, on=keys).assign(metric="delta_fro_layer"))
        wr = fro[fro["module"].astype(str).str.rsplit(".", n=1).str[-1].isin(WRITERS.values())]
        al = w[w["metric"] == "delta_along_refusal"].loc[:, [*keys, "layer", "module", "value"]]
        m = wr.merge(al.rename(columns={"value": "along"}), on=[*keys, "layer", "module"], how="inner")
        if len(m):
            sums = m.assign(a2=m["along"].astype(float) ** 2, f2=m["value"].astype(float) ** 2)
            sums = sums.groupby([*keys, "layer"])[["a2", "f2"]].sum()
            frac = np.sqrt(sums["a2"] / sums["f2"].where(sums["f2"] > 0))
            parts.append(want.merge(frac.rename("value").reset_index(), on=keys).assign(metric="along_layer"))
    if not parts:
        return pd.DataFrame(columns=["run", "method", "lr", "step", "layer", "metric", "value"])
    return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------------------------- summaries

# the numbers a reader compares across a pair, method side then full side
SUMMARY_COLUMNS = (
    "refusal_rate",
    "chrf",
    "cos_to_base_at_rl",
    "drift_min_layer",
    "drift_centre",
    "delta_fro_total",
    "layer_pr",
    "share_mlp",
    "along_writers",
    "along_vs_chance",
    "drift_per_update",
    "necessity_base_at_rl",
    "sufficiency_base_at_rl",
)


def pair_summary(contrast: pd.DataFrame, columns: Sequence[str] = SUMMARY_COLUMNS) -> pd.DataFrame:
    """One row per pair: the method side's numbers as ``<col>`` and its full partner's as ``<col>_full``."""
    if contrast is None or not len(contrast):
        return pd.DataFrame(columns=["pairing", "pair"])
    cols = [c for c in columns if c in contrast.columns]
    ident = ["pairing", "pair", "run", "method", "lr", "step", "chrf_gap", "update_ratio"]
    m = contrast[contrast["role"] == "method"].loc[:, [*ident, *cols]]
    f = contrast[contrast["role"] == "full"].loc[:, ["pairing", "pair", "run", "step", *cols]]
    f = f.rename(columns={"run": "full_run", "step": "full_step", **{c: f"{c}_full" for c in cols}})
    out = m.merge(f, on=["pairing", "pair"], how="left")
    order = [*ident, "full_run", "full_step"] + [x for c in cols for x in (c, f"{c}_full")]
    return out.loc[:, order].reset_index(drop=True)


def _pct(v) -> str:
    return f"{100 * float(v):.0f}%" if pd.notna(v) else "?"


def _num(v, fmt: str = ".3f") -> str:
    return format(float(v), fmt) if pd.notna(v) else "?"


def headline(contrast: pd.DataFrame) -> list[str]:
    """Plain sentences from the matched-lr pairs: refusal, drift, update size and place, aim at the direction."""
    s = pair_summary(contrast)
    lines = []
    for r in s[s["pairing"] == "matched_lr"].sort_values(["lr", "method"]).to_dict("records"):
        size = (
            f"{float(r['delta_fro_total_full']) / float(r['delta_fro_total']):.1f}x"
            if pd.notna(r.get("delta_fro_total")) and float(r["delta_fro_total"]) > 0
            else "?"
        )
        text = (
            f"lr {float(r['lr']):g}, {r['method']} vs full (final checkpoints): refusal "
            f"{_pct(r.get('refusal_rate'))} vs {_pct(r.get('refusal_rate_full'))}, cos to the base direction at the "
            f"refusal layer {_num(r.get('cos_to_base_at_rl'))} vs {_num(r.get('cos_to_base_at_rl_full'))}, "
            f"||dW||_F {_num(r.get('delta_fro_total'), '.2f')} vs {_num(r.get('delta_fro_total_full'), '.2f')} "
            f"(full {size} larger)"
        )
        if "share_mlp" in r:
            text += f", MLP share of the update {_pct(r['share_mlp'])} vs {_pct(r['share_mlp_full'])}"
        if "along_vs_chance" in r:
            text += (
                f", along-refusal fraction {_num(r['along_vs_chance'], '.2f')}x vs "
                f"{_num(r['along_vs_chance_full'], '.2f')}x chance"
            )
        lines.append(text)
    return lines
