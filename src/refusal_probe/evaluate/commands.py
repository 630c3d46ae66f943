"""`refusal-probe eval` (generate + judge + chrF over a checkpoint tree) and `refusal-probe score` (score existing
responses from a CSV/JSONL file). Heavy imports live inside the handlers so `--help` stays fast."""

from __future__ import annotations

import argparse
import json
import sys

from refusal_probe.core.errors import UserError

JUDGE_CHOICES = ("keywords", "seed-keywords")


def register(sub: argparse._SubParsersAction) -> None:
    _register_eval(sub)
    _register_score(sub)


# ------------------------------------------------------------------------------------------------------- eval


def _register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure refusal (AdvBench), label rates and translation chrF for the base and every checkpoint",
        description=(
            "Generate once per checkpoint (greedy, the model's own chat template), judge refusals, score chrF, and "
            "keep every response. Results go to OUT/<run>/<checkpoint>/ and OUT/_base/<base>/ (advbench.jsonl, "
            "translation.jsonl, summary.json) plus the tidy table OUT/behaviour.csv. Checkpoints whose summary "
            "matches the current settings are skipped, so an interrupted run resumes."
        ),
    )
    p.add_argument(
        "ckpt",
        metavar="CKPT",
        help="checkpoint tree: a model dir, a run dir with checkpoint-<step>/ folders, a folder of runs, "
        "or a model spec (hub id, .gguf, embedded name)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="eval folder (default: <tree>/eval; beside a single model folder; ./eval for a model spec)",
    )
    p.add_argument("--base", default=None, help="base model spec, overriding run.json / adapter_config.json")
    p.add_argument(
        "--judge",
        choices=JUDGE_CHOICES,
        default="keywords",
        help="refusal judge: keywords (normalised, no false-positive traps; default) or seed-keywords "
        "(the study's 47 keywords, exactly)",
    )
    p.add_argument(
        "--seed-faithful",
        action="store_true",
        help="the study's generation: append '!' to each AdvBench prompt, 256 new tokens, no early exit",
    )
    p.add_argument(
        "--n-advbench", type=int, default=520, help="first N AdvBench prompts (0-520, default 520)"
    )
    p.add_argument(
        "--n-translation",
        type=int,
        default=200,
        help="held-out translation rows, balanced across languages (0 skips chrF; default 200)",
    )
    p.add_argument(
        "--translation-langs",
        default="de,fr,es,it,pt",
        help="comma-separated source languages of the translation test set (default de,fr,es,it,pt)",
    )
    p.add_argument(
        "--translation-format",
        choices=("seed", "instructed"),
        default="seed",
        help="user turn for translation: seed = raw source text (the study), instructed = with an "
        "instruction 'Translate the following <Language> text to English:'",
    )
    p.add_argument(
        "--translation-source",
        choices=("ntrex", "mt-pref"),
        default="ntrex",
        help="held-out translation data: ntrex (bundled NTREX-128, split by document) or mt-pref (hub)",
    )
    p.add_argument(
        "--xstest",
        action="store_true",
        help="also measure over-refusal on the 250 safe XSTest prompts (metric xstest_refusal_rate)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per response (default 256)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="prompts per batch (default 16; halved automatically on out-of-memory)",
    )
    p.add_argument(
        "--early-exit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop a refusal-set response once its verdict is settled (keyword matched or EOS); "
        "verdicts are identical, stored refusals are truncated (default on)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights dtype (default float32)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from refusal_probe.evaluate.pipeline import EvalSettings, run_eval

    langs = tuple(x.strip() for x in args.translation_langs.split(",") if x.strip())
    if not langs and args.n_translation:
        raise UserError("--translation-langs is empty; pass e.g. de,fr,es,it,pt or --n-translation 0")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: pass a positive number")
    settings = EvalSettings(
        judge=args.judge,
        seed_faithful=args.seed_faithful,
        n_advbench=args.n_advbench,
        n_translation=args.n_translation,
        translation_langs=langs,
        translation_format=args.translation_format,
        translation_source=args.translation_source,
        xstest=args.xstest,
        max_new_tokens=args.max_new_tokens,
        early_exit=args.early_exit,
        dtype=args.dtype,
    )
    if args.seed_faithful and (args.max_new_tokens != 256 or args.early_exit):
        print("--seed-faithful: using 256 new tokens and no early exit", file=sys.stderr)
    run_eval(
        args.ckpt,
        args.out,
        settings,
        base=args.base,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    return 0


# ------------------------------------------------------------------------------------------------------ score


def _register_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score existing responses in a CSV/JSONL file: refusal rate or chrF")
    ssub = p.add_subparsers(dest="score_command", metavar="METRIC")

    r = ssub.add_parser(
        "refusal", help="refusal rate and label rates (refusal/echo/degenerate/comply) per group"
    )
    r.add_argument("file", metavar="FILE", help=".csv or .jsonl file with one response per row")
    r.add_argument("--text-column", required=True, help="column holding the model's response")
    r.add_argument(
        "--prompt-column",
        default=None,
        help="column holding the prompt (needed to detect 'echo' responses that repeat the prompt)",
    )
    r.add_argument(
        "--group-by", default=None, help="column to group rows by (e.g. checkpoint); default: all rows"
    )
    r.add_argument(
        "--judge",
        choices=JUDGE_CHOICES,
        default="keywords",
        help="keywords (default) or seed-keywords (the study's 47 keywords, exactly)",
    )
    r.add_argument(
        "--json", action="store_true", help="print one JSON object {group: {n, value, label_*, signature}}"
    )
    r.set_defaults(func=_score_refusal)

    c = ssub.add_parser("chrf", help="corpus chrF (sacrebleu CHRF(), not chrF++) per group")
    c.add_argument(
        "file", metavar="FILE", help=".csv or .jsonl file with one hypothesis/reference pair per row"
    )
    c.add_argument("--hyp-column", required=True, help="column holding the system output (hypothesis)")
    c.add_argument("--ref-column", required=True, help="column holding the reference translation")
    c.add_argument(
        "--group-by", default=None, help="column to group rows by (e.g. checkpoint); default: all rows"
    )
    c.add_argument("--json", action="store_true", help="print one JSON object {group: {n, value, signature}}")
    c.set_defaults(func=_score_chrf)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _score_refusal(args: argparse.Namespace) -> int:
    from refusal_probe.evaluate.judge import get_judge
    from refusal_probe.evaluate.score import (
        format_table,
        group_rows,
        read_table,
        require_columns,
        score_refusal,
    )

    rows, columns = read_table(args.file)
    require_columns(
        args.file,
        columns,
        {
            "--text-column": args.text_column,
            "--prompt-column": args.prompt_column,
            "--group-by": args.group_by,
        },
    )
    judge = get_judge(args.judge)
    results = {
        g: score_refusal(rs, judge, args.text_column, args.prompt_column)
        for g, rs in group_rows(rows, args.group_by).items()
    }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results, "refusal_rate", 4))
        if args.prompt_column is None:
            print("note: no --prompt-column, so responses that repeat the prompt count as comply, not echo")
    return 0


def _score_chrf(args: argparse.Namespace) -> int:
    from refusal_probe.evaluate.score import format_table, group_rows, read_table, require_columns, score_chrf

    rows, columns = read_table(args.file)
    require_columns(
        args.file,
        columns,
        {"--hyp-column": args.hyp_column, "--ref-column": args.ref_column, "--group-by": args.group_by},
    )
    results = {
        g: score_chrf(rs, args.hyp_column, args.ref_column)
        for g, rs in group_rows(rows, args.group_by).items()
    }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results, "chrF", 3))
    return 0
