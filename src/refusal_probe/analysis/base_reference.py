"""The base model's reference: its refusal direction (chosen once per base and settings, through the direction cache
that `directions` shares) and its drift/separability rows against itself."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_probe.analysis import per_prompt
from refusal_probe.analysis.cache import note_corrupt
from refusal_probe.analysis.measure import capture_pair, causal_drift_rows, check_causal_layers, internal_rows
from refusal_probe.analysis.settings import CACHE_FORMAT, AnalyzeSettings
from refusal_probe.core.hashing import cache_key, model_fingerprint
from refusal_probe.core.io import atomic_dir, read_json, safe_filename, write_json
from refusal_probe.models.quant import QuantSpec
from refusal_probe.probe.prompts import PromptSets

ROWS_JSON = "rows.json"


@dataclass
class BaseReference:
    spec: str
    key: str
    dir: Path  # analysis cache folder holding the DirectionResult files and rows.json
    result: Any  # DirectionResult
    rows: list[dict]  # drift + separability rows of the base against itself
    reused: str = ""  # where the candidate scores came from when they were not computed here
    prompts: dict | None = None  # per-prompt block on the eval's AdvBench prompts (analysis/per_prompt.py)

    @property
    def unit(self):
        return self.result.unit

    @property
    def directions(self):
        return self.result.directions


def _load(spec: str, key: str, folder: Path) -> BaseReference | None:
    from refusal_probe.probe.direction_result import DirectionResult

    if not folder.exists():
        return None
    try:
        stored = read_json(folder / ROWS_JSON)
        rows = stored["rows"]
        if not isinstance(rows, list):
            raise ValueError("rows is not a list")
        result = DirectionResult.load(folder)
        return BaseReference(spec, key, folder, result, rows, prompts=stored.get("prompts"))
    except Exception as exc:  # noqa: BLE001 - bad JSON, truncated safetensors, missing file: recompute
        note_corrupt(folder, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def base_reference(
    spec: str,
    base_dir: Path,
    settings: AnalyzeSettings,
    sets: PromptSets,
    cache: Path,
    quant: QuantSpec | None = None,
    prompts: Any = None,
) -> BaseReference:
    """Choose the base model's refusal direction (Arditi et al.) and measure the base, once per base and settings."""
    # Weight deltas are never taken of the base against itself: toggling --no-deltas keeps its cache.
    key = cache_key(
        "base", model_fingerprint(base_dir), settings.key_fields(ignore=("deltas",)), quant and quant.tag
    )
    folder = cache / "base" / f"{safe_filename(Path(spec).name)}{'-' + quant.tag if quant else ''}-{key}"
    ref = _load(spec, key, folder)
    if ref is not None:
        if not per_prompt.current(ref.prompts, prompts):  # the eval changed since: measure its prompts alone
            _add_prompts(ref, base_dir, settings, quant, prompts)
        return ref

    from refusal_probe.models.source import load_model
    from refusal_probe.probe import direction_cache
    from refusal_probe.probe.refusal_tokens import refusal_token_ids
    from refusal_probe.probe.select import check_layer, select_direction
    from refusal_probe.probe.settings import DEFAULT_RULES

    model, tok = load_model(base_dir, device=settings.device, quant=quant)
    check_layer(model, settings.layer)
    check_causal_layers(model, settings)
    harmful, harmless = capture_pair(model, tok, sets, settings, label="base")
    ids = refusal_token_ids(tok)
    search = settings.resolved_search()
    dkey = direction_cache.selection_key(
        [base_dir],
        sets.prompts,
        ids,
        DEFAULT_RULES,
        layer=settings.layer,
        position=settings.position,
        search=search,
        dtype="float32",
        quant=quant.tag if quant else None,
        backend=settings.backend,
    )
    result = direction_cache.load(dkey)
    reused = ""
    if result is not None:
        result = direction_cache.rechoose(result, settings.layer, settings.position)
        reused = str(direction_cache.entry(dkey))
        print(f"reusing the candidate scores in {reused} (same model and settings)")
    else:
        result = select_direction(
            model,
            tok,
            sets["harmful_train"],
            sets["harmless_train"],
            sets["harmful_val"],
            sets["harmless_val"],
            layer=settings.layer,
            position=settings.position,
            batch_size=settings.batch_size,
            refusal_ids=ids,
            backend=settings.backend,
            seed=settings.seed,
            progress=settings.progress,
            search=search,
            activations=(harmful, harmless),
            sources=sets.sources,
            available=sets.available,
        )
        direction_cache.store(dkey, result)
    result.settings["model"] = spec
    result.settings["cache_key"] = dkey
    rows = internal_rows(result.directions, result, harmful, harmless, settings)
    rows += causal_drift_rows(model, tok, sets, settings, result, None)  # own direction = base direction
    block = per_prompt.entry_block(model, tok, result, settings.batch_size, prompts)
    del model
    _save(folder, result, {"format": CACHE_FORMAT, "spec": spec, "rows": rows, **block})
    return BaseReference(spec, key, folder, result, rows, reused, prompts=block.get("prompts"))


def _add_prompts(ref: BaseReference, base_dir: Path, settings: AnalyzeSettings, quant, prompts) -> None:
    """Measure the eval's AdvBench prompts on a cached base and store them with its reference."""
    from refusal_probe.models.source import load_model

    model, tok = load_model(base_dir, device=settings.device, quant=quant)
    ref.prompts = per_prompt.entry_block(model, tok, ref.result, settings.batch_size, prompts)["prompts"]
    del model
    stored = {"format": CACHE_FORMAT, "spec": ref.spec, "rows": ref.rows, "prompts": ref.prompts}
    _save(ref.dir, ref.result, stored, replace=True)


def _save(folder: Path, result, rows: dict, replace: bool = False) -> None:
    """Write the reference whole (a temporary folder renamed into place): shards of an array job that compute the
    same base side by side never read half of one."""

    def write(tmp: Path) -> None:
        result.save(tmp)
        write_json(tmp / ROWS_JSON, rows)

    # without replace, a folder another task stored first is kept: it holds the same numbers
    atomic_dir(folder, write, replace=replace)
