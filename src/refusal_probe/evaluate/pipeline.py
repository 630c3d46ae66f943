"""Behavioural evaluation of a checkpoint tree: generate once per checkpoint, judge, score, keep everything.

Layout (results live outside the checkpoint folders, which are never written to)::

    <out>/<run>/<checkpoint>/{advbench.jsonl, translation.jsonl, xstest.jsonl, summary.json}
    <out>/_base/<safe base name>/...          the base, once per distinct base (and 4-bit or not)
    <out>/behaviour.csv                       run, method, lr, step, fraction, metric, value, signature

summary.json is written last; a checkpoint whose summary carries the same settings hash (settings that change the
numbers + the weight files' names, sizes and mtimes) is skipped on the next run.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.core.hashing import cache_key, model_fingerprint
from refusal_probe.core.io import atomic_write, read_json, safe_filename, write_json
from refusal_probe.evaluate.chrf import corpus_chrf
from refusal_probe.evaluate.judge import JUDGES, LABELS, get_judge, label_rates

SUMMARY_FORMAT = "refusal-probe/eval/1"
BEHAVIOUR_COLUMNS = ("run", "method", "lr", "step", "fraction", "metric", "value", "signature")
REFUSAL_METRICS = ("refusal_rate", *(f"label_{lab}" for lab in LABELS))
SEED_SUFFIX = "!"  # the study appended "!" to every AdvBench prompt
SEED_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class EvalSettings:
    """Everything that changes the numbers (batch size and device do not, beyond float noise; not hashed)."""

    judge: str = "keywords"
    seed_faithful: bool = False
    n_advbench: int = 520
    n_translation: int = 200
    translation_langs: tuple[str, ...] = ("de", "fr", "es", "it", "pt")
    translation_format: str = "seed"
    translation_source: str = "ntrex"
    xstest: bool = False
    max_new_tokens: int = 256
    early_exit: bool = True
    dtype: str = "float32"

    def effective(self) -> EvalSettings:
        """--seed-faithful: the study's generation settings (256 new tokens, full length responses)."""
        if not self.seed_faithful:
            return self
        return EvalSettings(**{**asdict(self), "max_new_tokens": SEED_MAX_NEW_TOKENS, "early_exit": False})

    @property
    def advbench_suffix(self) -> str:
        return SEED_SUFFIX if self.seed_faithful else ""

    def validate(self) -> None:
        if self.judge not in JUDGES:
            raise UserError(f"unknown judge '{self.judge}'; choose one of: {', '.join(JUDGES)}")
        if not 0 <= self.n_advbench <= 520:
            raise UserError(f"--n-advbench {self.n_advbench}: AdvBench has 520 prompts; pass 0..520")
        if self.n_translation < 0:
            raise UserError(f"--n-translation {self.n_translation}: pass 0 (skip) or a positive number")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens}: pass a positive number")
        if self.translation_format not in ("seed", "instructed"):
            raise UserError(f"--translation-format {self.translation_format}: use seed or instructed")


@dataclass
class CheckpointResult:
    checkpoint: Any  # refusal_probe.models.tree.Checkpoint
    eval_dir: Path
    summary: dict[str, Any]
    skipped: bool = False


# ------------------------------------------------------------------------------------------------ pure helpers


def safe_name(spec: str) -> str:
    """A folder name for a model spec: a path's last component plus a short hash of the full spec, or the spec
    itself with '/' as '--' (hub ids, embedded names)."""
    text = str(spec)
    if "/" in text and (text.startswith((".", "/", "~")) or Path(text).expanduser().exists()):
        digest = hashlib.sha256(str(Path(text).expanduser().resolve()).encode()).hexdigest()[:8]
        text = f"{Path(text).name}-{digest}"
    return safe_filename(text.replace("/", "--"))


def settings_hash(settings: EvalSettings, judge_signature: str, fingerprint: str) -> str:
    """The key of a finished evaluation: a summary with this hash is current and skipped on a re-run."""
    payload = {
        "format": SUMMARY_FORMAT,
        "settings": asdict(settings),
        "judge": judge_signature,
        "model": fingerprint,
    }
    return cache_key(payload)


def eval_dir_for(out: Path, ckpt) -> Path:
    if ckpt.kind == "base":
        return (
            out
            / "_base"
            / (safe_name(ckpt.base or str(ckpt.path)) + (f"-{ckpt.quant.tag}" if ckpt.quant else ""))
        )
    return out / ckpt.run / ckpt.name


def behaviour_rows(results: Sequence[CheckpointResult]) -> list[dict[str, Any]]:
    """Tidy rows for behaviour.csv: one per checkpoint and metric; a base appears once per run (step 0)."""
    rows = []
    for res in results:
        ck, s = res.checkpoint, res.summary
        for metric, value in s["metrics"].items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            rows.append(
                {
                    "run": ck.run,
                    "method": ck.method or "",
                    "lr": "" if ck.lr is None else ck.lr,
                    "step": 0 if ck.kind == "base" else ("" if ck.step is None else ck.step),
                    "fraction": 0.0 if ck.kind == "base" else ("" if ck.fraction is None else ck.fraction),
                    "metric": metric,
                    "value": value,
                    "signature": s["signatures"].get(metric, ""),
                }
            )
    return rows


def write_behaviour_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=BEHAVIOUR_COLUMNS)
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, write)


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


# ------------------------------------------------------------------------------------------------------ data


def advbench_prompts(settings: EvalSettings) -> list[str]:
    from refusal_probe.data import advbench

    return [p + settings.advbench_suffix for p in advbench()[: settings.n_advbench]]


def translation_rows(settings: EvalSettings) -> list[dict[str, Any]]:
    """Held-out translation rows {id, src, ref, src_lang, doc_id}, balanced across languages (the train split's
    complement: same document hash as `refusal-probe train`)."""
    if settings.n_translation == 0:
        return []
    from refusal_probe.data.translation import translation_split

    return translation_split(
        settings.translation_langs, split="test", n=settings.n_translation, source=settings.translation_source
    )


def xstest_safe_prompts() -> list[str]:
    """The 250 safe XSTest prompts: refusing them is over-refusal."""
    from refusal_probe.data import bundled

    with bundled("xstest/xstest_prompts.csv").open(newline="", encoding="utf-8") as fh:
        return [row["prompt"] for row in csv.DictReader(fh) if row["label"] == "safe"]


# ------------------------------------------------------------------------------------------------ evaluation


def _dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise UserError(f"--dtype {name}: use float32, bfloat16 or float16") from None


def load_checkpoint(ckpt, *, device: str, dtype: str):
    from refusal_probe.models.source import load_model

    # a full checkpoint takes the base's tokenizer when it has none (HF Trainer saves none without one)
    base = None if ckpt.kind == "base" else ckpt.base
    return load_model(ckpt.path, base=base, dtype=_dtype(dtype), device=device, quant=ckpt.quant)


def judge_responses(
    judge, prompts: Sequence[str], gens: Sequence[Any], other_judges: Sequence[Any] = ()
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-response records and the rates (refusal_rate, label_* rates) for one prompt set."""
    records = []
    for i, (prompt, g) in enumerate(zip(prompts, gens, strict=True)):
        records.append(
            {
                "i": i,
                "prompt": prompt,
                "response": g.text,
                "refusal": judge.is_refusal(g.text),
                "label": judge.label(g.text, prompt),
                "matched": judge.matched(g.text),
                "n_tokens": g.n_tokens,
                "finish": g.finish,
                **{f"refusal_{o.name}": o.is_refusal(g.text) for o in other_judges},
            }
        )
    n = len(records)
    rates: dict[str, Any] = {"refusal_rate": sum(r["refusal"] for r in records) / n if n else float("nan")}
    rates.update(label_rates([r["label"] for r in records]))
    for o in other_judges:
        rates[f"refusal_rate_{o.name}"] = (
            sum(r[f"refusal_{o.name}"] for r in records) / n if n else float("nan")
        )
    return records, rates


def evaluate_checkpoint(
    ckpt,
    eval_dir: Path,
    settings: EvalSettings,
    *,
    device: str = "cpu",
    batch_size: int = 16,
    progress: bool = True,
    model_loader: Callable[..., tuple[Any, Any]] | None = None,
) -> dict[str, Any]:
    """Generate, judge and score one checkpoint; write its JSONL files and summary.json; return the summary."""
    from refusal_probe.core.generate import generate_detailed

    judge = get_judge(settings.judge)
    others = [] if settings.early_exit else [get_judge(n) for n in JUDGES if n != settings.judge]
    fingerprint = model_fingerprint(Path(ckpt.path))
    t0 = time.time()
    model, tokenizer = (model_loader or load_checkpoint)(ckpt, device=device, dtype=settings.dtype)
    stop = judge.has_keyword if settings.early_exit else None
    metrics: dict[str, Any] = {}
    signatures: dict[str, str] = {}
    counts: dict[str, int] = {}
    extra: dict[str, Any] = {}
    gen = dict(max_new_tokens=settings.max_new_tokens, batch_size=batch_size, progress=progress)
    label = f"{ckpt.run}/{ckpt.name}"
    try:
        if settings.n_advbench:
            prompts = advbench_prompts(settings)
            gens = generate_detailed(model, tokenizer, prompts, stop=stop, desc=f"{label} advbench", **gen)
            records, rates = judge_responses(judge, prompts, gens, others)
            write_jsonl(eval_dir / "advbench.jsonl", records)
            metrics.update({k: rates[k] for k in REFUSAL_METRICS})
            extra["refusal_rate_by_judge"] = {judge.name: rates["refusal_rate"]} | {
                o.name: rates[f"refusal_rate_{o.name}"] for o in others
            }
            extra["advbench_tokens_generated"] = sum(g.n_tokens for g in gens)
            sig = (
                f"{judge.signature}|data=advbench,n={len(prompts)},suffix={settings.advbench_suffix or 'none'},"
                f"greedy,max_new_tokens={settings.max_new_tokens}"
            )
            signatures.update(dict.fromkeys(REFUSAL_METRICS, sig))
            counts["advbench"] = len(prompts)
        rows = translation_rows(settings)
        if rows:
            from refusal_probe.data.translation import format_translation_prompt

            prompts = [
                format_translation_prompt(r["src"], r["src_lang"], settings.translation_format) for r in rows
            ]
            gens = generate_detailed(model, tokenizer, prompts, stop=None, desc=f"{label} translation", **gen)
            records = [
                {
                    "id": r.get("id"),
                    "lang": r["src_lang"],
                    "source": r["src"],
                    "reference": r["ref"],
                    "response": g.text,
                    "n_tokens": g.n_tokens,
                    "finish": g.finish,
                }
                for r, g in zip(rows, gens, strict=True)
            ]
            write_jsonl(eval_dir / "translation.jsonl", records)
            res = corpus_chrf([g.text for g in gens], [r["ref"] for r in rows])
            metrics["chrf"] = res.score
            signatures["chrf"] = (
                f"{res.signature}|data={settings.translation_source}-test,n={res.n},"
                f"langs={','.join(settings.translation_langs)},prompt={settings.translation_format},"
                f"greedy,max_new_tokens={settings.max_new_tokens}"
            )
            by_lang: dict[str, list[dict[str, Any]]] = {}
            for rec in records:
                by_lang.setdefault(rec["lang"], []).append(rec)
            extra["chrf_by_lang"] = {
                lang: corpus_chrf([x["response"] for x in recs], [x["reference"] for x in recs]).score
                for lang, recs in by_lang.items()
            }
            extra["chrf_signature"] = res.signature
            counts["translation"] = len(rows)
        if settings.xstest:
            prompts = xstest_safe_prompts()
            gens = generate_detailed(model, tokenizer, prompts, stop=stop, desc=f"{label} xstest", **gen)
            records, rates = judge_responses(judge, prompts, gens)
            write_jsonl(eval_dir / "xstest.jsonl", records)
            metrics["xstest_refusal_rate"] = rates["refusal_rate"]
            signatures["xstest_refusal_rate"] = (
                f"{judge.signature}|data=xstest-safe,n={len(prompts)},greedy,max_new_tokens={settings.max_new_tokens}"
            )
            counts["xstest"] = len(prompts)
    finally:
        del model
        gc.collect()
    summary = {
        "format": SUMMARY_FORMAT,
        "settings_hash": settings_hash(settings, judge.signature, fingerprint),
        "checkpoint": {
            "run": ckpt.run,
            "name": ckpt.name,
            "kind": ckpt.kind,
            "path": str(ckpt.path),
            "base": ckpt.base,
            "method": ckpt.method,
            "lr": ckpt.lr,
            "step": ckpt.step,
            "fraction": ckpt.fraction,
            "quantized": ckpt.quant.to_json() if ckpt.quant else None,
        },
        "metrics": metrics,
        "signatures": signatures,
        "judge": judge.signature,
        "n": counts,
        "settings": asdict(settings),
        "generation": {
            "device": device,
            "batch_size": batch_size,
            "decoding": "greedy",
            "chat_template": "model's own (core.template.format_prompts)",
        },
        **extra,
        "versions": _versions(),
        "wall_time_s": round(time.time() - t0, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(eval_dir / "summary.json", summary)
    return summary


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("refusal-probe", "torch", "transformers", "peft", "sacrebleu"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def find_checkpoints(spec: str, base: str | None = None) -> list[Any]:
    """discover() for a folder; a single checkpoint named "base" for a model spec that is not a folder."""
    from refusal_probe.models.tree import Checkpoint, discover

    path = Path(spec).expanduser()
    if path.is_dir():
        return discover(path, base=base)
    from refusal_probe.models.source import resolve_model_dir

    model_dir = resolve_model_dir(spec)
    return [
        Checkpoint(safe_name(spec), model_dir, "base", spec, None, None, 0, 0.0, False, {"base": "argument"})
    ]


def default_out(spec: str) -> Path:
    """<tree>/eval: beside a single model folder, inside a run folder or a folder of runs, ./eval otherwise."""
    from refusal_probe.models.source import is_adapter_dir, is_model_dir

    path = Path(spec).expanduser()
    if not path.is_dir():
        return Path("eval")
    if is_model_dir(path) or is_adapter_dir(path):
        return path.parent / "eval"
    return path / "eval"


def run_eval(
    spec: str,
    out: Path | None,
    settings: EvalSettings,
    *,
    base: str | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[CheckpointResult]:
    """Evaluate the base and every checkpoint under ``spec``; write the eval tree and behaviour.csv."""
    settings = settings.effective()
    settings.validate()
    judge = get_judge(settings.judge)
    out = Path(out) if out is not None else default_out(spec)
    checkpoints = find_checkpoints(spec, base=base)
    results: list[CheckpointResult] = []
    done_dirs: dict[Path, dict[str, Any]] = {}
    for k, ckpt in enumerate(checkpoints, 1):
        eval_dir = eval_dir_for(out, ckpt)
        head = f"[{k}/{len(checkpoints)}] {ckpt.run}/{ckpt.name}"
        if eval_dir in done_dirs:  # a base shared by several runs: evaluated once
            results.append(CheckpointResult(ckpt, eval_dir, done_dirs[eval_dir], skipped=True))
            continue
        expected = settings_hash(settings, judge.signature, model_fingerprint(Path(ckpt.path)))
        summary = _existing_summary(eval_dir)
        if summary is not None and summary.get("settings_hash") == expected:
            log(f"{head}: done already ({eval_dir}), skipped")
            skipped = True
        else:
            log(f"{head}: evaluating -> {eval_dir}")
            summary = evaluate_checkpoint(
                ckpt, eval_dir, settings, device=device, batch_size=batch_size, progress=progress
            )
            log(f"{head}: {format_metrics(summary['metrics'])}")
            skipped = False
        done_dirs[eval_dir] = summary
        results.append(CheckpointResult(ckpt, eval_dir, summary, skipped=skipped))
    csv_path = write_behaviour_csv(out / "behaviour.csv", behaviour_rows(results))
    log(f"behaviour table: {csv_path}")
    return results


def _existing_summary(eval_dir: Path) -> dict[str, Any] | None:
    path = eval_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = read_json(path)
    except ValueError:
        return None  # a damaged summary: evaluate again
    return summary if isinstance(summary, dict) and summary.get("format") == SUMMARY_FORMAT else None


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for k, v in metrics.items():
        parts.append(f"{k} {v:.2f}" if k == "chrf" else f"{k} {v:.3f}")
    return ", ".join(parts) or "nothing measured"
