"""`refusal-probe directions`: extract, score and choose a model's refusal direction (and optionally validate it).

Heavy libraries are imported inside the handler so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from refusal_probe.core.errors import UserError, require
from refusal_probe.core.io import safe_filename
from refusal_probe.probe import DEFAULT_SEED

DTYPES = ("float32", "bfloat16", "float16")
TOP_N = 5


class _DefaultsFormatter(argparse.HelpFormatter):
    """Append "(default: X)" to option help, unless the help already names its default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or "default" in text
        ):
            return text
        return f"{text} (default: %(default)s)"


VALIDATE_SETS = {
    "advbench": "bundled:advbench/harmful_behaviors.csv",
    "harmful_test": "bundled:refusal_direction/harmful_test.json",
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the probe area's subcommands."""
    _register_directions(sub)


def _register_directions(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "directions",
        formatter_class=_DefaultsFormatter,
        help="find a model's refusal direction (Arditi et al. 2024) and check that it mediates refusal",
        description=(
            "Difference-of-means refusal directions at every layer and post-instruction position, scored on held-out "
            "prompts (ablation lowers refusal on harmful prompts, addition induces it on harmless ones, ablation "
            "leaves harmless next-token distributions alone) and the best one chosen. Writes candidates.csv, "
            "direction.json, directions.safetensors (and validation.json with --validate)."
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
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="use candidates of this layer only (with --position: no choice)",
    )
    p.add_argument(
        "--position",
        type=int,
        default=None,
        help="use candidates at this post-instruction position only (-P..-1)",
    )
    p.add_argument(
        "--n-train", type=int, default=128, help="harmful and harmless prompts each for the mean difference"
    )
    p.add_argument(
        "--n-val", type=int, default=32, help="held-out harmful and harmless prompts each for scoring"
    )
    p.add_argument(
        "--harmful",
        type=Path,
        default=None,
        help="harmful prompt file for extraction (default: bundled harmful_train without its AdvBench items)",
    )
    p.add_argument(
        "--harmless",
        type=Path,
        default=None,
        help="harmless prompt file for extraction (default: bundled harmless_train)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass / generate call")
    p.add_argument(
        "--search",
        choices=("auto", "full", "coarse"),
        default="auto",
        help="score every (layer, position) candidate (full), or the last position at every layer then all "
        "positions at the 3 best layers (coarse, ~4x cheaper); auto = full on CUDA, coarse on CPU",
    )
    p.add_argument(
        "--validate-set",
        choices=sorted(VALIDATE_SETS),
        default="advbench",
        help="held-out harmful prompts for --validate: advbench (the study's 520; extraction uses the "
        "harmful_train split without its AdvBench items) or harmful_test (JailbreakBench, HarmBench "
        "test, StrongREJECT: harder) (default: advbench)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="recompute candidate scores even when --out holds scores made with the same settings",
    )
    p.add_argument(
        "--validate", action="store_true", help="also generate and judge refusal with/without intervention"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens generated per answer with --validate"
    )
    p.add_argument(
        "--n-validate",
        type=int,
        default=64,
        help="prompts each for --validate, disjoint from extraction and selection: harmful from "
        "--validate-set, harmless from harmless_val minus the selection sample (default: 64)",
    )
    p.add_argument("--judge", default="keywords", help="refusal judge for --validate")
    p.add_argument(
        "--refusal-tokens",
        default=None,
        help='comma-separated refusal openers whose first token is scored, e.g. "I,Sorry" (default: a built-in list)',
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (float32 on CPU)")
    p.add_argument(
        "--backend",
        choices=("hooks", "transformer-lens"),
        default="hooks",
        help="how activations are captured",
    )
    p.add_argument(
        "--kl-threshold", type=float, default=0.1, help="discard candidates whose ablation KL exceeds this"
    )
    p.add_argument(
        "--induce-threshold",
        type=float,
        default=0.0,
        help="discard candidates whose steering score is below this",
    )
    p.add_argument(
        "--max-layer-fraction",
        type=float,
        default=0.8,
        help="discard candidates from layers >= floor(this * layers)",
    )
    p.add_argument(
        "--skip-late-layers",
        action="store_true",
        help="do not score the layers --max-layer-fraction discards anyway (saves about 20%% of the scoring time)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for sampling the prompt subsets")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_directions)


def default_out(spec: str) -> Path:
    """./directions/<model name>: the folder name, hub name or .gguf stem; a checkpoint folder keeps its run's name."""
    text = str(spec).rstrip("/\\")
    path = Path(text)
    name = path.stem if path.suffix.lower() == ".gguf" else path.name
    if re.match(r"^checkpoint-\d+$", name) and path.parent.name:
        name = f"{path.parent.name}-{name}"
    return Path("directions") / safe_filename(name)


def _check_args(args: argparse.Namespace) -> None:
    require(args.n_train >= 1, f"--n-train {args.n_train} must be at least 1")
    require(args.n_val >= 1, f"--n-val {args.n_val} must be at least 1")
    require(args.batch_size >= 1, f"--batch-size {args.batch_size} must be at least 1")
    require(args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    require(args.n_validate >= 1, f"--n-validate {args.n_validate} must be at least 1")
    require(
        0 < args.max_layer_fraction <= 1, f"--max-layer-fraction {args.max_layer_fraction} must be in (0, 1]"
    )
    require(
        args.position is None or args.position < 0, f"--position {args.position} must be negative (-P..-1)"
    )
    if args.out is not None and args.out.exists():
        require(args.out.is_dir(), f"--out {args.out} exists and is not a folder; pass a folder path")


def run_directions(args: argparse.Namespace) -> int:
    import torch

    from refusal_probe import data
    from refusal_probe.models.source import load_model, model_revision, resolve_model_dir
    from refusal_probe.probe.select import (
        parse_phrases,
        refusal_token_ids,
    )

    _check_args(args)
    harmful = data.load_prompts(args.harmful) if args.harmful else data.harmful_train()
    harmless = data.load_prompts(args.harmless) if args.harmless else data.harmless_train()
    harmful_val, harmless_val = data.harmful_val(), data.harmless_val()
    sources = {
        "harmful_train": str(args.harmful)
        if args.harmful
        else "bundled:refusal_direction/harmful_train_no_advbench.json",
        "harmless_train": str(args.harmless)
        if args.harmless
        else "bundled:refusal_direction/harmless_train_first2048.json",
        "harmful_val": "bundled:refusal_direction/harmful_val.json",
        "harmless_val": "bundled:refusal_direction/harmless_val_first1024.json",
    }
    out = args.out or default_out(args.model)
    model, tokenizer = load_model(
        args.model, base=args.base, dtype=getattr(torch, args.dtype), device=args.device
    )
    phrases = parse_phrases(args.refusal_tokens) if args.refusal_tokens else None
    ids = refusal_token_ids(tokenizer, phrases) if phrases else refusal_token_ids(tokenizer)

    try:
        revision = model_revision(args.model)
    except UserError:
        revision = None
    request = dict(
        n_train=args.n_train,
        n_val=args.n_val,
        seed=args.seed,
        backend=args.backend,
        max_layer_fraction=args.max_layer_fraction,
        kl_threshold=args.kl_threshold,
        induce_threshold=args.induce_threshold,
        refusal_ids=ids,
        forced_layer=args.layer,
        forced_position=args.position,
        search=_resolved_search(args),
        model_revision=revision,
        dtype=args.dtype,
    )
    result = None if args.fresh else _reuse(out, request, sources)
    if result is not None:
        print(f"reusing the candidate scores in {out} (same model and settings; --fresh recomputes them)")
    else:
        result = _select(args, model, tokenizer, harmful, harmless, harmful_val, harmless_val, ids, sources)
    result.settings.update(
        model=str(args.model),
        base=args.base,
        model_dir=str(resolve_model_dir(args.model)),
        model_revision=revision,
        dtype=args.dtype,
        device=args.device,
        refusal_phrases=phrases or "default",
    )
    result.save(out)
    _print_choice(result, out)
    if args.validate:
        _validate(args, model, tokenizer, result, harmless_val, sources, out)
    return 0


def _resolved_search(args: argparse.Namespace) -> str:
    if args.search != "auto":
        return args.search
    return "full" if str(args.device).startswith("cuda") else "coarse"


def _reuse(out: Path, request: dict, sources: dict):
    """The saved result re-chosen from its candidate scores when it was scored with exactly these settings.

    Scoring is the expensive part (~30 min on a CPU for a 0.5B model); an interrupted or re-run command, or one after
    the choice rule changed, need not redo it.
    """
    from refusal_probe.probe.select import DirectionResult, choose

    if not (Path(out) / "direction.json").is_file():
        return None
    try:
        saved = DirectionResult.load(out)
    except UserError:
        return None
    same = all(saved.settings.get(k) == v for k, v in request.items())
    same = same and {k: v.get("source") for k, v in saved.settings.get("prompts", {}).items()} == sources
    if not same:
        return None
    if request["forced_layer"] is None or request["forced_position"] is None:
        row = choose(saved.scores)
        saved.layer, saved.position, saved.warning = (
            int(row["layer"]),
            int(row["position"]),
            str(row["warning"]),
        )
        n_pos = saved.directions.shape[1]
        saved.direction = saved.directions[saved.layer, n_pos + saved.position].clone()
    return saved


def _select(args, model, tokenizer, harmful, harmless, harmful_val, harmless_val, ids, sources):
    from refusal_probe.probe.select import select_direction

    return select_direction(
        model,
        tokenizer,
        harmful,
        harmless,
        harmful_val,
        harmless_val,
        n_train=args.n_train,
        n_val=args.n_val,
        layer=args.layer,
        position=args.position,
        batch_size=args.batch_size,
        refusal_ids=ids,
        max_layer_fraction=args.max_layer_fraction,
        kl_threshold=args.kl_threshold,
        induce_threshold=args.induce_threshold,
        skip_late_layers=args.skip_late_layers,
        search=args.search,
        backend=args.backend,
        seed=args.seed,
        progress=not args.quiet,
        sources=sources,
    )


def _validate(args, model, tokenizer, result, harmless_val, sources, out) -> None:
    from refusal_probe import data
    from refusal_probe.probe.select import sample_prompts
    from refusal_probe.probe.validate import save_validation, validate

    selection = set(sample_prompts(harmless_val, args.n_val, args.seed))
    harmful_set = data.advbench() if args.validate_set == "advbench" else data.harmful_test()
    harmful_check = sample_prompts(harmful_set, args.n_validate, args.seed)
    harmless_check = sample_prompts(
        [p for p in harmless_val if p not in selection], args.n_validate, args.seed
    )
    report = validate(
        model,
        tokenizer,
        result,
        harmful_check,
        harmless_check,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        judge=args.judge,
        progress=not args.quiet,
    )
    report["prompts"] = {
        "harmful": VALIDATE_SETS[args.validate_set] + " (not used for extraction or selection)",
        "harmless": sources["harmless_val"] + " minus the selection sample",
        "n_each": args.n_validate,
        "seed": args.seed,
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
