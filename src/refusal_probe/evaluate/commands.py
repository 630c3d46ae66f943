"""`refusal-probe eval` (generate + judge + chrF over a checkpoint tree) and `refusal-probe score` (score existing
responses from a CSV/JSONL file). Heavy imports live inside the handlers so `--help` stays fast."""

from __future__ import annotations

import argparse
import json
import sys

from refusal_probe.core.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    _register_eval(sub)
    _register_score(sub)


# ------------------------------------------------------------------------------------------------------- eval


def _register_eval(sub: argparse._SubParsersAction) -> None:
    from refusal_probe.evaluate.settings import EvalSettings

    p = sub.add_parser(
        "eval",
        help="measure refusal (AdvBench), label rates and translation chrF for the base and every checkpoint",
        description=(
            "Generate once per checkpoint (greedy, the model's own chat template), judge refusals, score chrF, and "
            "keep every response. Results go to OUT/<run>/<checkpoint>/ and OUT/_base/<base>/ (advbench.jsonl, "
            "translation.jsonl, summary.json) plus the tidy table OUT/behaviour.csv and OUT/eval.json. "
            "Checkpoints whose summary matches the current settings are skipped, so an interrupted run resumes; "
            "--shard i/n splits the work over an array job, and a final plain run assembles the table."
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
        metavar="DIR",
        default=None,
        help="eval folder (default: <tree>/eval; <parent>/<name>-eval beside a model folder or a run with its "
        "final model at the root; ./eval/<name> for a model spec)",
    )
    p.add_argument(
        "--base",
        metavar="MODEL",
        default=None,
        help="base model spec, overriding run.json / adapter_config.json",
    )
    p.add_argument(
        "--shard",
        metavar="I/N",
        default=None,
        help="array job: evaluate every N-th unit (distinct base or checkpoint) from #I (0-based) and write no "
        "table; then run once without --shard to assemble behaviour.csv",
    )
    EvalSettings.add_arguments(p)
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from refusal_probe.core.settings import cli_values
    from refusal_probe.evaluate.pipeline import run_eval
    from refusal_probe.evaluate.settings import SEED_MAX_NEW_TOKENS, EvalSettings

    settings = EvalSettings.from_cli(cli_values(args))
    if settings.seed_faithful and (settings.max_new_tokens != SEED_MAX_NEW_TOKENS or settings.early_exit):
        print(f"--seed-faithful: using {SEED_MAX_NEW_TOKENS} new tokens and no early exit", file=sys.stderr)
    run_eval(args.ckpt, args.out, settings, base=args.base, shard=args.shard)
    return 0


# ------------------------------------------------------------------------------------------------------ score


def _register_score(sub: argparse._SubParsersAction) -> None:
    from refusal_probe.evaluate.judge import JUDGES

    p = sub.add_parser(
        "score",
        description="Score responses that already exist (ours or anyone's). Empty or missing responses (empty, "
        "null or NaN) are counted (n_empty) and said so; the judge's rule decides whether they are refusals.",
        help="score existing responses in a CSV/JSONL file: refusal rate or chrF",
    )
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
        choices=JUDGES,
        default=JUDGES[0],
        help="keywords (counts an empty response as a refusal) or seed-keywords (the study's 47 keywords "
        "exactly; an empty response is not a refusal) [default: %(default)s]",
    )
    r.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object {group: {n, value, label_*, n_empty, empty_is_refusal, signature}}",
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
    c.add_argument(
        "--json", action="store_true", help="print one JSON object {group: {n, value, n_empty, signature}}"
    )
    c.set_defaults(func=_score_chrf)

    p.set_defaults(func=_score_without_metric)


def _score_without_metric(args: argparse.Namespace) -> int:
    raise UserError(
        "say what to score: `refusal-probe score refusal FILE --text-column COL` or "
        "`refusal-probe score chrf FILE --hyp-column COL --ref-column COL`"
    )


def _score_refusal(args: argparse.Namespace) -> int:
    from refusal_probe.evaluate.judge import get_judge
    from refusal_probe.evaluate.score import (
        empty_note,
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
    note = empty_note(results, "responses", judge)
    if args.json:
        print(json.dumps(results, indent=2))
        if note:
            print(note, file=sys.stderr)
    else:
        print(format_table(results, "refusal_rate", 4))
        if note:
            print(note)
        if args.prompt_column is None:
            print("note: no --prompt-column, so responses that repeat the prompt count as comply, not echo")
    return 0


def _score_chrf(args: argparse.Namespace) -> int:
    from refusal_probe.evaluate.score import (
        empty_note,
        format_table,
        group_rows,
        read_table,
        require_columns,
        score_chrf,
    )

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
    note = empty_note(results, "hypotheses")
    if args.json:
        print(json.dumps(results, indent=2))
        if note:
            print(note, file=sys.stderr)
    else:
        print(format_table(results, "chrF", 3))
        if note:
            print(note)
    return 0
