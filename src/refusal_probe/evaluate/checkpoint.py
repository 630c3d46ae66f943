"""Evaluate one checkpoint: load it, generate once per prompt set (greedy, its own chat template), judge refusals,
score chrF, write every response and, last, summary.json (the mark that this checkpoint is finished)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from refusal_probe.core.hashing import model_fingerprint
from refusal_probe.core.io import write_json
from refusal_probe.evaluate.chrf import corpus_chrf
from refusal_probe.evaluate.judge import JUDGES, get_judge, label_rates
from refusal_probe.evaluate.prompts import PromptSets
from refusal_probe.evaluate.results import REFUSAL_METRICS, SUMMARY_FORMAT, settings_hash, write_jsonl
from refusal_probe.evaluate.settings import EvalSettings


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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
    prompts: PromptSets,
    *,
    model_loader: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Generate, judge and score one checkpoint; write its JSONL files and summary.json; return the summary."""
    from refusal_probe.core.generate import generate_detailed
    from refusal_probe.data.translation import format_translation_prompt

    judge = get_judge(settings.judge)
    others = [] if settings.early_exit else [get_judge(n) for n in JUDGES if n != settings.judge]
    fingerprint = model_fingerprint(Path(ckpt.path))
    t0 = time.time()
    model, tokenizer = (model_loader or load_checkpoint)(ckpt, device=settings.device, dtype=settings.dtype)
    stop = judge.has_keyword if settings.early_exit else None
    metrics: dict[str, Any] = {}
    signatures: dict[str, str] = {}
    counts: dict[str, int] = {}
    extra: dict[str, Any] = {}
    gen: dict[str, Any] = dict(
        max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size, progress=settings.progress
    )
    label = f"{ckpt.run}/{ckpt.name}"
    decoding = f"greedy,max_new_tokens={settings.max_new_tokens}"
    try:
        if prompts.advbench:
            texts = prompts.advbench
            gens = generate_detailed(model, tokenizer, texts, stop=stop, desc=f"{label} advbench", **gen)
            records, rates = judge_responses(judge, texts, gens, others)
            write_jsonl(eval_dir / "advbench.jsonl", records)
            metrics.update({k: rates[k] for k in REFUSAL_METRICS})
            extra["refusal_rate_by_judge"] = {judge.name: rates["refusal_rate"]} | {
                o.name: rates[f"refusal_rate_{o.name}"] for o in others
            }
            extra["advbench_tokens_generated"] = sum(g.n_tokens for g in gens)
            sig = (
                f"{judge.signature}|data=advbench,n={len(texts)},suffix={settings.advbench_suffix or 'none'},"
                + decoding
            )
            signatures.update(dict.fromkeys(REFUSAL_METRICS, sig))
            counts["advbench"] = len(texts)
        rows = prompts.translation
        if rows:
            texts = [
                format_translation_prompt(r["src"], r["src_lang"], settings.translation_format) for r in rows
            ]
            gens = generate_detailed(model, tokenizer, texts, stop=None, desc=f"{label} translation", **gen)
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
                + decoding
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
        if prompts.xstest:
            texts = prompts.xstest
            gens = generate_detailed(model, tokenizer, texts, stop=stop, desc=f"{label} xstest", **gen)
            records, rates = judge_responses(judge, texts, gens)
            write_jsonl(eval_dir / "xstest.jsonl", records)
            metrics["xstest_refusal_rate"] = rates["refusal_rate"]
            signatures["xstest_refusal_rate"] = (
                f"{judge.signature}|data=xstest-safe,n={len(texts)}," + decoding
            )
            counts["xstest"] = len(texts)
    finally:
        del model
        gc.collect()
    summary = {
        "format": SUMMARY_FORMAT,
        "settings_hash": settings_hash(settings, judge.signature, fingerprint),
        "checkpoint": {
            "run": ckpt.run,
            "name": ckpt.name,
            "key": ckpt.key,
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
        "settings": settings.hashed(),
        "generation": {
            "device": settings.device,
            "batch_size": settings.batch_size,
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
