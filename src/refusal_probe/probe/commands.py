"""`refusal-probe directions`: extract, score and choose a model's refusal direction (and optionally validate it).

Every setting is a field of :class:`~refusal_probe.probe.settings.DirectionsSettings` (its description is the --help
line). Inputs are checked before any model loads; the candidate scores go through the direction cache that `analyze`
shares. Heavy libraries are imported inside the handler so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from refusal_probe.core.errors import UserError
from refusal_probe.core.io import safe_filename
from refusal_probe.core.settings import cli_values
from refusal_probe.probe.settings import VALIDATE_SETS, DirectionsSettings, build

TOP_N = 5


def register(sub: argparse._SubParsersAction) -> None:
    """Add the probe area's subcommands."""
    p = sub.add_parser(
        "directions",
        help="find a model's refusal direction (Arditi et al. 2024) and check that it mediates refusal",
        description=(
            "Difference-of-means refusal directions at every layer and post-instruction position, scored on held-out "
            "prompts (ablation lowers refusal on harmful prompts, addition induces it on harmless ones, ablation "
            "leaves harmless next-token distributions alone) and the best one chosen. Writes candidates.csv, "
            "direction.json, directions.safetensors (and validation.json with --validate). Candidate scores are "
            "cached (shared with `analyze`): the same model and settings are scored once."
        ),
    )
    p.add_argument(
        "model", metavar="MODEL", help="model: local dir, adapter dir, .gguf file, embedded name or hub id"
    )
    p.add_argument(
        "--base", default=None, help="base model for an adapter MODEL (default: the one the adapter names)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default: ./directions/<model name>)"
    )
    DirectionsSettings.add_arguments(p)
    p.set_defaults(func=run_directions)


def default_out(spec: str) -> Path:
    """./directions/<model name>: the folder name, hub name or .gguf stem; a checkpoint folder keeps its run's name."""
    text = str(spec).rstrip("/\\")
    path = Path(text)
    name = path.stem if path.suffix.lower() == ".gguf" else path.name
    if re.match(r"^checkpoint-\d+$", name) and path.parent.name:
        name = f"{path.parent.name}-{name}"
    return Path("directions") / safe_filename(name)


def _check_out(out: Path, model_spec: str) -> None:
    """--out must be a folder we may write, not inside the model that is read."""
    from refusal_probe.core.io import prepare_output

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; pass a folder path")
    model = Path(model_spec).expanduser()
    if model.is_dir():
        target, folder = out.expanduser().resolve(), model.resolve()
        if target == folder or folder in target.parents:
            raise UserError(
                f"--out {out}: lies inside the model folder {model_spec}, which is never written; pass --out DIR"
            )
    prepare_output(out)


def run_directions(args: argparse.Namespace) -> int:
    import torch

    from refusal_probe.core.io import output_lock
    from refusal_probe.models.source import (
        adapter_base,
        is_adapter_dir,
        load_model,
        looks_local,
        model_revision,
        resolve_model_dir,
    )
    from refusal_probe.probe import direction_cache
    from refusal_probe.probe.prompts import prompt_sets
    from refusal_probe.probe.refusal_tokens import parse_phrases, refusal_token_ids

    s: DirectionsSettings = build(DirectionsSettings, cli_values(args))
    # every input is checked before a model loads
    sets = prompt_sets(s.n_train, s.n_val, s.seed, s.harmful, s.harmless, n_flag="--n-train")
    phrases = parse_phrases(s.refusal_tokens) if s.refusal_tokens else None
    if looks_local(
        args.model
    ):  # a typo in a path is said before anything is written (a hub id resolves later)
        resolve_model_dir(args.model)
    out = args.out or default_out(args.model)
    _check_out(out, args.model)

    with output_lock(out, "directions"):
        model, tokenizer = load_model(
            args.model, base=args.base, dtype=getattr(torch, s.dtype), device=s.device
        )
        ids = refusal_token_ids(tokenizer, phrases) if phrases else refusal_token_ids(tokenizer)
        try:
            revision = model_revision(args.model)
        except UserError:
            revision = None
        model_dir = resolve_model_dir(args.model)
        dirs = [model_dir]
        if is_adapter_dir(model_dir):
            base = args.base or adapter_base(model_dir)
            if base is None:
                raise UserError(f"{model_dir}: the adapter names no base model; pass --base")
            dirs.append(resolve_model_dir(base))
        key = direction_cache.selection_key(
            dirs,
            sets.prompts,
            ids,
            s.rules(),
            layer=s.layer,
            position=s.position,
            search=s.resolved_search(),
            dtype=s.dtype,
            quant=None,
            backend=s.backend,
        )
        result = None if s.fresh else direction_cache.load(key)
        if result is not None:
            result = direction_cache.rechoose(result, s.layer, s.position)
            print(
                f"reusing the candidate scores in {direction_cache.entry(key)} (same model and settings; "
                "--fresh recomputes them)"
            )
        else:
            result = _select(s, model, tokenizer, sets, ids)
            direction_cache.store(key, result)
        result.settings.update(
            model=str(args.model),
            base=args.base,
            model_dir=str(model_dir),
            model_revision=revision,
            dtype=s.dtype,
            device=s.device,
            refusal_phrases=phrases or "default",
            cache_key=key,
        )
        result.save(out)
        _print_choice(result, out)
        if s.validate:
            _validate(s, model, tokenizer, result, sets, out)
    return 0


def _select(s: DirectionsSettings, model, tokenizer, sets, ids):
    from refusal_probe.probe.select import select_direction

    return select_direction(
        model,
        tokenizer,
        sets["harmful_train"],
        sets["harmless_train"],
        sets["harmful_val"],
        sets["harmless_val"],
        layer=s.layer,
        position=s.position,
        batch_size=s.batch_size,
        refusal_ids=ids,
        rules=s.rules(),
        search=s.resolved_search(),
        backend=s.backend,
        seed=s.seed,
        progress=not s.quiet,
        sources=sets.sources,
        available=sets.available,
    )


def _validate(s: DirectionsSettings, model, tokenizer, result, sets, out) -> None:
    from refusal_probe import data
    from refusal_probe.probe.select import sample_prompts
    from refusal_probe.probe.validate import save_validation, validate

    selection = set(sets["harmless_val"])
    source, load = VALIDATE_SETS[s.validate_set]
    harmful_check = sample_prompts(load(), s.n_validate, s.seed)
    harmless_check = sample_prompts(
        [p for p in data.harmless_val() if p not in selection], s.n_validate, s.seed
    )
    report = validate(
        model,
        tokenizer,
        result,
        harmful_check,
        harmless_check,
        max_new_tokens=s.max_new_tokens,
        batch_size=s.batch_size,
        judge=s.judge,
        progress=not s.quiet,
    )
    report["prompts"] = {
        "harmful": source + " (not used for extraction or selection)",
        "harmless": sets.sources["harmless_val"] + " minus the selection sample",
        "n_each": s.n_validate,
        "seed": s.seed,
    }
    save_validation(out, report)
    _print_validation(report)


def _print_choice(result, out: Path) -> None:
    s = result.scores
    row = result.chosen
    print(
        f"refusal direction: layer {result.layer}, position {result.position} (of {len(result.positions)}), "
        f"norm {row.get('direction_norm', float('nan')):.4g}"
    )
    print(
        f"  refusal score harmful {_fmt(row.get('harmful_baseline'))} -> {_fmt(row.get('ablation_score'))} ablated; "
        f"harmless {_fmt(row.get('harmless_baseline'))} -> {_fmt(row.get('steering_score'))} added; "
        f"KL {_fmt(row.get('kl'))}"
    )
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)
    kept = s[s["filtered_reason"] == ""]
    if len(kept):
        pool, label = kept, "top candidates (kept, lowest ablation score first)"
    else:
        late = s["filtered_reason"].str.contains("layer|zero|nan|not scored")
        pool = s[~late & s["ablation_score"].notna()]
        pool = pool if len(pool) else s[s["ablation_score"].notna()]
        label = "top candidates (all filtered; lowest ablation score first)"
    top = pool.sort_values("ablation_score").head(TOP_N)
    print(f"{label}; {len(kept)} of {len(s)} kept:")
    cols = ["layer", "position", "ablation_score", "steering_score", "kl", "filtered_reason"]
    print(top[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out}/candidates.csv, direction.json, directions.safetensors")


def _print_validation(report: dict) -> None:
    cut = report["harmful_relative_cut"]
    print(
        f"validation ({report['n_harmful']} harmful, {report['n_harmless']} harmless prompts; {report['judge_signature']}):"
    )
    print(
        f"  harmful refusal rate   {report['harmful_refusal_rate']:.1%} -> {report['harmful_refusal_rate_ablated']:.1%} "
        f"with ablation (relative cut {'n/a' if cut is None else f'{cut:.1%}'})"
    )
    print(
        f"  harmless refusal rate  {report['harmless_refusal_rate']:.1%} -> {report['harmless_refusal_rate_added']:.1%} "
        f"with addition at layer {report['layer']}"
    )


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
