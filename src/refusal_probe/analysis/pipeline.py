"""`refusal-probe analyze`: walk a checkpoint tree, measure every checkpoint's internals against its base, and write
tables, plots and a report.

Work is cached per checkpoint under ``<out>/cache/``, keyed by a fingerprint of the checkpoint's files, its base's
reference and the settings, so a re-run recomputes only what changed, an interrupted run resumes, and ``--shard i/n``
lets several machines fill the cache for one final plain run to assemble. Checkpoints are only ever read.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from refusal_probe import data
from refusal_probe.core.errors import UserError
from refusal_probe.core.hashing import cache_key, model_fingerprint, sha256_file
from refusal_probe.core.io import read_json, safe_filename, write_json
from refusal_probe.models.quant import QuantSpec
from refusal_probe.models.tree import Checkpoint, discover
from refusal_probe.probe import DEFAULT_SEED

CACHE_FORMAT = "refusal-probe/analysis-cache/2"  # bump whenever a cached number changes meaning


@dataclass
class AnalyzeSettings:
    """Everything that changes the numbers (part of the cache key), plus how to run (not part of it)."""

    n_prompts: int = field(
        default=128, metadata={"help": "harmful and harmless prompts each for directions and drift"}
    )
    n_val: int = field(default=32, metadata={"help": "held-out prompts each for choosing the base direction"})
    harmful: str | None = field(default=None, metadata={"help": "harmful prompt file (default: bundled)"})
    harmless: str | None = field(default=None, metadata={"help": "harmless prompt file (default: bundled)"})
    layer: int | None = None
    position: int | None = None
    search: str = field(
        default="auto", metadata={"help": "direction search: full, coarse, auto (full on CUDA)"}
    )
    separability: bool = True
    deltas: bool = True
    seed: int = DEFAULT_SEED
    # how to run: not part of the cache key
    batch_size: int = 16
    backend: str = "hooks"
    device: str = "cpu"
    progress: bool = True

    RUNTIME = ("batch_size", "device", "progress")

    def resolved_search(self) -> str:
        if self.search != "auto":
            return self.search
        return "full" if self.device.startswith("cuda") else "coarse"

    def key_fields(self, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in self.RUNTIME + ignore}
        out["search"] = self.resolved_search()
        out["cache_format"] = CACHE_FORMAT
        for name in ("harmful", "harmless"):
            if out[name]:
                out[name] = {"sha256": sha256_file(Path(out[name]))}  # content, not where it lies
        return out


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UserError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. --shard 0/4")
    return int(m.group(1)), int(m.group(2))


# ------------------------------------------------------------------------------------------------ prompt sets


def prompt_sets(settings: AnalyzeSettings) -> dict[str, tuple[list[str], str]]:
    """(prompts, source description) for extraction and for held-out selection."""
    from refusal_probe.probe.select import sample_prompts

    if settings.harmful:
        harmful_all, hsrc = data.load_prompts(settings.harmful), settings.harmful
    else:
        harmful_all, hsrc = data.harmful_train(), "bundled refusal_direction harmful_train minus AdvBench"
    if settings.harmless:
        harmless_all, lsrc = data.load_prompts(settings.harmless), settings.harmless
    else:
        harmless_all, lsrc = data.harmless_train(), "bundled Alpaca (refusal_direction harmless_train)"
    n = settings.n_prompts
    return {
        "harmful": (sample_prompts(harmful_all, n, settings.seed), hsrc),
        "harmless": (sample_prompts(harmless_all, n, settings.seed), lsrc),
        "harmful_val": (
            sample_prompts(data.harmful_val(), settings.n_val, settings.seed),
            "bundled refusal_direction harmful_val (HarmBench)",
        ),
        "harmless_val": (
            sample_prompts(data.harmless_val(), settings.n_val, settings.seed),
            "bundled refusal_direction harmless_val (Alpaca)",
        ),
    }


# ------------------------------------------------------------------------------------------------ base reference


@dataclass
class BaseReference:
    spec: str
    key: str
    dir: Path  # cache folder holding the DirectionResult files and rows.json
    result: Any  # DirectionResult
    rows: list[dict]  # drift + separability rows of the base against itself

    @property
    def unit(self):
        return self.result.unit

    @property
    def directions(self):
        return self.result.directions


def base_reference(
    spec: str, base_dir: Path, settings: AnalyzeSettings, prompts, cache: Path, quant: QuantSpec | None = None
) -> BaseReference:
    """Choose the base model's refusal direction (Arditi et al.) and measure the base, once per base and settings."""
    from refusal_probe.probe.select import DirectionResult

    # Weight deltas are never taken of the base against itself: toggling --no-deltas keeps its cache.
    key = cache_key(
        "base", model_fingerprint(base_dir), settings.key_fields(ignore=("deltas",)), quant and quant.tag
    )
    folder = cache / "base" / f"{safe_filename(Path(spec).name)}{'-' + quant.tag if quant else ''}-{key}"
    if (folder / "rows.json").is_file():
        return BaseReference(
            spec, key, folder, DirectionResult.load(folder), read_json(folder / "rows.json")["rows"]
        )

    from refusal_probe.models.source import load_model
    from refusal_probe.probe.select import select_direction

    model, tok = load_model(base_dir, device=settings.device, quant=quant)
    harmful, harmless = _capture_pair(model, tok, prompts, settings, label="base")
    result = select_direction(
        model,
        tok,
        prompts["harmful"][0],
        prompts["harmless"][0],
        prompts["harmful_val"][0],
        prompts["harmless_val"][0],
        n_train=None,
        n_val=None,
        layer=settings.layer,
        position=settings.position,
        batch_size=settings.batch_size,
        backend=settings.backend,
        seed=settings.seed,
        progress=settings.progress,
        search=settings.resolved_search(),
        activations=(harmful, harmless),
        sources={
            "harmful_train": prompts["harmful"][1],
            "harmless_train": prompts["harmless"][1],
            "harmful_val": prompts["harmful_val"][1],
            "harmless_val": prompts["harmless_val"][1],
        },
    )
    result.settings["model"] = spec
    rows = _internal_rows(result.directions, result, harmful, harmless, settings)
    del model
    result.save(folder)
    write_json(folder / "rows.json", {"format": CACHE_FORMAT, "spec": spec, "rows": rows})
    return BaseReference(spec, key, folder, result, rows)


def _capture_pair(model, tok, prompts, settings: AnalyzeSettings, label: str):
    from refusal_probe.probe.activations import capture

    kw = dict(
        batch_size=settings.batch_size,
        keep=settings.separability,
        backend=settings.backend,
        progress=settings.progress,
    )
    harmful = capture(model, tok, prompts["harmful"][0], desc=f"{label}: harmful", **kw)
    harmless = capture(model, tok, prompts["harmless"][0], desc=f"{label}: harmless", **kw)
    return harmful, harmless


def _internal_rows(ckpt_dirs, ref_result, harmful, harmless, settings: AnalyzeSettings) -> list[dict]:
    """Drift (vs the base's directions at the chosen position), direction norms and separability per layer."""
    import torch

    from refusal_probe.probe.drift import drift_rows, separability_rows

    pos = ref_result.position
    p = harmful.index(pos)
    rows = drift_rows(ref_result.directions, ckpt_dirs, ref_result.unit, harmful, harmless, pos)
    norms = torch.linalg.vector_norm(ckpt_dirs[:, p].to(torch.float64), dim=-1)
    rows += [{"layer": layer, "metric": "dir_norm", "value": float(v)} for layer, v in enumerate(norms)]
    if settings.separability:
        rows += separability_rows(harmful, harmless, pos, seed=settings.seed)
    return rows


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_rows(
    ckpt: Checkpoint, ref: BaseReference, settings: AnalyzeSettings, prompts
) -> dict[str, list]:
    """Drift/separability and weight-delta rows of one fine-tuned checkpoint."""
    from refusal_probe.models.source import load_model
    from refusal_probe.probe.drift import directions as diff_of_means

    if ckpt.kind == "full":
        _check_same_shape(ckpt, ref)
    model, tok = load_model(ckpt.path, base=ckpt.base, device=settings.device, quant=ckpt.quant)
    harmful, harmless = _capture_pair(model, tok, prompts, settings, label=ckpt.key)
    del model
    dirs = diff_of_means(harmful, harmless)
    if dirs.shape != ref.directions.shape:
        raise UserError(
            f"{ckpt.path}: activations have shape {tuple(dirs.shape)} but the base {ref.spec} has "
            f"{tuple(ref.directions.shape)}; pass the right --base"
        )
    drift = _internal_rows(dirs, ref.result, harmful, harmless, settings)
    deltas: list[dict] = []
    if settings.deltas:
        from refusal_probe.models.source import resolve_model_dir
        from refusal_probe.probe.weights import weight_deltas

        # one refusal direction (the base's chosen one) for every layer: how much each update writes into it
        per_layer = {layer: ref.unit for layer in range(ref.directions.shape[0])}
        deltas = weight_deltas(ckpt.path, resolve_model_dir(ckpt.base), per_layer, progress=settings.progress)
    return {"drift": drift, "deltas": deltas}


def _check_same_shape(ckpt: Checkpoint, ref: BaseReference) -> None:
    """Fail before loading anything when a full checkpoint cannot be a fine-tune of the base."""
    cfg = read_json(ckpt.path / "config.json")
    cfg = cfg.get("text_config") or cfg
    n_layers, _, d = ref.directions.shape
    got = (cfg.get("num_hidden_layers"), cfg.get("hidden_size"))
    if None not in got and got != (n_layers, d):
        raise UserError(
            f"{ckpt.path}: {got[0]} layers of width {got[1]}, but base {ref.spec} has {n_layers} of width {d}; "
            "pass the right --base"
        )


def _entry_path(cache: Path, ckpt: Checkpoint, ref: BaseReference, settings: AnalyzeSettings) -> Path:
    key = cache_key(
        "ckpt",
        model_fingerprint(ckpt.path),
        ref.key,
        settings.key_fields(),
        ckpt.kind,
        ckpt.quant and ckpt.quant.tag,
    )
    return cache / "checkpoints" / safe_filename(ckpt.run) / f"{safe_filename(ckpt.name)}-{key}.json"


# ------------------------------------------------------------------------------------------------ orchestration


def analyze(
    root: str | Path,
    out: str | Path | None = None,
    base: str | None = None,
    settings: AnalyzeSettings | None = None,
    shard: str | None = None,
    behaviour: str | Path | None = None,
) -> Path:
    from tqdm.auto import tqdm

    settings = settings or AnalyzeSettings()
    root = Path(root)
    out = Path(out) if out else default_out(root)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; pass a folder path")
    shard_ij = parse_shard(shard)
    ckpts = discover(root, base)
    prompts = prompt_sets(settings)
    cache = out / "cache"
    started = time.time()

    refs: dict[tuple[str, bool], BaseReference] = {}
    for c in ckpts:
        if c.kind == "base" and _ref_key(c) not in refs:
            refs[_ref_key(c)] = base_reference(c.base, c.path, settings, prompts, cache, quant=c.quant)

    todo = [c for c in ckpts if c.kind != "base"]
    if shard_ij:
        i, n = shard_ij
        todo = todo[i::n]
    computed = 0
    bar = tqdm(todo, desc="checkpoints", unit="ckpt", disable=not settings.progress)
    for c in bar:
        bar.set_postfix_str(c.key)
        path = _entry_path(cache, c, refs[_ref_key(c)], settings)
        if path.is_file():
            continue
        rows = checkpoint_rows(c, refs[_ref_key(c)], settings, prompts)
        write_json(path, {"format": CACHE_FORMAT, "checkpoint": c.key, "path": str(c.path), **rows})
        computed += 1
    if shard_ij:
        print(
            f"shard {shard}: {computed} checkpoint(s) computed, {len(todo) - computed} cached; "
            f"run `refusal-probe analyze {root}` without --shard to assemble"
        )
        return out
    return assemble(root, out, ckpts, refs, settings, prompts, behaviour, time.time() - started)


def _ref_key(c: Checkpoint) -> tuple[str, str]:
    """Runs share a base reference when they share the base model and its precision (QLoRA: the 4-bit base)."""
    return (c.base, c.quant.tag if c.quant else "")


def _ref_name(key: tuple[str, str]) -> str:
    return f"{key[0]} ({key[1]})" if key[1] else key[0]


def default_out(root: Path) -> Path:
    """``<tree>/analysis``; beside a single model or adapter folder, never inside it."""
    from refusal_probe.models.source import is_adapter_dir, is_model_dir

    return root.parent / "analysis" if is_model_dir(root) or is_adapter_dir(root) else root / "analysis"


def _tag(c: Checkpoint, rows: list[dict]) -> list[dict]:
    meta = {
        "run": c.run,
        "checkpoint": c.name,
        "method": c.method,
        "lr": c.lr,
        "step": c.step,
        "fraction": c.fraction,
    }
    return [{**meta, "module": r.get("module", ""), **r} for r in rows]


def load_behaviour(root: Path, behaviour: str | Path | None):
    import pandas as pd

    from refusal_probe.evaluate.pipeline import default_out as eval_out

    path = Path(behaviour) if behaviour else eval_out(str(root)) / "behaviour.csv"
    if not path.is_file():
        if behaviour:
            raise UserError(
                f"{path}: behaviour table not found; run `refusal-probe eval` first or drop --behaviour"
            )
        return pd.DataFrame(), None
    try:
        df = pd.read_csv(path, dtype={"run": str, "method": str}, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read behaviour table ({exc}); re-run `refusal-probe eval`") from None
    missing = {"run", "step", "metric", "value"} - set(df.columns)
    if missing:
        raise UserError(
            f"{path}: behaviour table lacks columns {sorted(missing)}; use the file `refusal-probe eval` writes"
        )
    return df, path


def assemble(root, out, ckpts, refs, settings, prompts, behaviour, elapsed) -> Path:
    """Join cached entries into tables, correlations, plots and the report (no model is loaded here)."""
    import pandas as pd

    from refusal_probe.analysis import correlate, plots, report, tables

    cache = out / "cache"
    drift_rows: list[dict] = []
    delta_rows: list[dict] = []
    for c in ckpts:
        ref = refs[_ref_key(c)]
        if c.kind == "base":
            drift_rows += _tag(c, ref.rows)
            continue
        path = _entry_path(cache, c, ref, settings)
        if not path.is_file():
            raise UserError(
                f"{c.key}: no cached result at {path}; run analyze without --shard (or the missing shard)"
            )
        entry = read_json(path)
        drift_rows += _tag(c, entry["drift"])
        delta_rows += _tag(c, entry["deltas"])

    drift = pd.DataFrame(drift_rows)
    deltas = pd.DataFrame(delta_rows)
    beh, beh_path = load_behaviour(root, behaviour)
    beh = _align_behaviour(beh, ckpts)

    written = tables.write_table(drift, out, "drift") + (
        tables.write_table(deltas, out, "weight_deltas") if len(deltas) else []
    )
    if len(beh):
        written += tables.write_table(beh, out, "behaviour")
    direction_rows = []
    for key, ref in refs.items():
        cand = ref.result.scores.copy()
        cand.insert(0, "base", _ref_name(key))
        direction_rows.append(cand)
    candidates = pd.concat(direction_rows, ignore_index=True)
    written += tables.write_table(candidates, out, "direction_candidates")

    layers = {c.run: refs[_ref_key(c)].result.layer for c in ckpts}
    table = tables.checkpoint_table(drift, deltas, beh, layers)
    written += tables.write_table(table, out, "checkpoints")
    y_cols = [c for c in ("refusal_rate", "chrf") if c in table.columns]
    corr = correlate.correlate(table, None, y_cols) if y_cols else pd.DataFrame()
    per_layer = correlate.per_layer_correlation(drift, beh) if "refusal_rate" in y_cols else None
    if len(corr):
        written += tables.write_table(corr, out, "correlations")

    summary = {
        "format": "refusal-probe/analysis/1",
        "tree": str(root),
        "bases": {
            _ref_name(key): {
                "refusal_layer": ref.result.layer,
                "position": ref.result.position,
                "direction_norm": float(ref.result.direction.norm()),
                "chosen": ref.result.chosen,
                "warning": ref.result.warning,
                "direction_files": str(ref.dir),
                "selection_settings": ref.result.settings,
            }
            for key, ref in refs.items()
        },
        "runs": {
            c.run: {"base": _ref_name(_ref_key(c)), "refusal_layer": refs[_ref_key(c)].result.layer}
            for c in ckpts
            if c.kind == "base"
        },
        "checkpoints": [
            {
                "run": c.run,
                "checkpoint": c.name,
                "kind": c.kind,
                "path": str(c.path),
                "base": c.base,
                "method": c.method,
                "lr": c.lr,
                "step": c.step,
                "fraction": c.fraction,
                "meta_source": c.meta_source,
            }
            for c in ckpts
        ],
        "settings": settings.key_fields(),
        "prompts": {k: {"n": len(v[0]), "source": v[1]} for k, v in prompts.items()},
        "how": {
            "layer": "residual stream entering decoder block l (resid_pre)",
            "positions": "post-instruction tokens of the model's own chat template (negative offsets)",
            "direction": "difference of means, harmful - harmless, float64",
            "cos_to_base": "cosine of checkpoint's direction with the base's at the same layer and chosen position",
            "proj_*": "mean projection of activations on the base's chosen unit refusal direction",
            "probe_acc": "held-out accuracy of a standardised logistic-regression probe (25% test split)",
            "diffmean_acc": "held-out accuracy of the difference-of-means projection thresholded at the class midpoint",
            "delta_fro": "Frobenius norm of W_ckpt - W_base (LoRA: from factors, r x r Gram form), float64",
            "delta_along_refusal": "norm of r_hat^T dW for modules writing to the residual stream (o_proj, down_proj)",
        },
        "behaviour": str(beh_path) if beh_path else None,
        "signatures": _signatures(beh),
        "elapsed_s": round(elapsed, 1),
        "tables": [p.name for p in written],
    }
    kw = dict(summary=summary, refusal_layer=layers)
    figures = plots.plot_drift_by_layer(drift, out, "cos_to_base", **kw)
    figures += plots.plot_drift_by_layer(drift, out, "proj_gap", **kw)
    if settings.separability:
        figures += plots.plot_drift_by_layer(drift, out, "probe_acc", **kw)
    figures += plots.plot_cos_heatmap(drift, out, **kw)
    if len(deltas):
        figures += plots.plot_delta_by_layer(deltas, out, summary=summary)
    figures += plots.plot_method_comparison(drift, deltas, beh, out, **kw)
    if len(beh):
        figures += plots.plot_behaviour(beh, table, out, summary=summary)
    summary["figures"] = [str(Path(f).name) for f in figures]
    write_json(out / "summary.json", summary)
    report.write_report(out, summary, table, corr, figures, per_layer=per_layer)
    return out


def _signatures(beh) -> dict[str, str]:
    """metric -> how it was computed, from the behaviour table's signature column."""
    if not len(beh) or "signature" not in beh:
        return {}
    pairs = beh.dropna(subset=["signature"]).drop_duplicates(["metric", "signature"])
    return {
        f"{m}" if (pairs["metric"] == m).sum() == 1 else f"{m} ({i})": sig
        for i, (m, sig) in enumerate(zip(pairs["metric"], pairs["signature"], strict=True))
    }


def _align_behaviour(beh, ckpts: list[Checkpoint]):
    """Keep behaviour rows of the runs in this tree; fill method/lr/fraction from the tree where the table lacks them."""
    import pandas as pd

    if beh is None or not len(beh):
        return pd.DataFrame()
    meta = {(c.run, c.step): c for c in ckpts}
    beh = beh[[(r, s) in meta for r, s in zip(beh["run"], beh["step"], strict=True)]].copy()
    for col in ("method", "lr", "fraction"):
        vals = [getattr(meta[(r, s)], col) for r, s in zip(beh["run"], beh["step"], strict=True)]
        beh[col] = beh[col].where(beh[col].notna(), vals) if col in beh else vals
    return beh
