"""Checking a chosen refusal direction by its effect on generated text, not only on next-token scores.

Greedy generation on held-out prompts, judged for refusal: harmful prompts without and with the direction ablated
everywhere (refusal should drop), harmless prompts without and with the direction added at its layer (refusal should
appear). The judge's signature is stored beside the rates so the numbers say how they were computed.

Generation is the evaluation stage's (``core.generate``: same chat template, EOS handling and greedy decoding as
the behaviour numbers), with its early exit: a sequence stops as soon as the judge's keyword test is true, which gives
the same verdicts as full-length decoding for a fraction of the cost. Example responses are therefore cut where the
verdict was settled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.core.io import write_json

FORMAT = "refusal-probe/validation/1"
VALIDATION_JSON = "validation.json"


def refusal_rate(flags: list[bool]) -> float:
    """Fraction of responses judged refusals."""
    if not flags:
        raise ValueError("no responses to rate")
    return sum(bool(f) for f in flags) / len(flags)


def relative_cut(before: float, after: float) -> float | None:
    """``(before - after) / before``: the share of refusals the ablation removed (None when nothing was refused)."""
    return None if before == 0 else (before - after) / before


def _get_judge(judge: Any) -> Any:
    if not isinstance(judge, str):
        return judge  # an object with .is_refusal(text), .name, .signature
    try:
        from refusal_probe.evaluate.judge import get_judge
    except ImportError as exc:
        raise UserError(
            f"refusal judge {judge!r} is unavailable ({exc}); install refusal-probe completely"
        ) from None
    return get_judge(judge)


def validate(
    model: Any,
    tokenizer: Any,
    result: Any,
    harmful_prompts: list[str],
    harmless_prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    judge: Any,
    progress: bool = True,
) -> dict[str, Any]:
    """Refusal rates on harmful prompts without/with ablation and harmless prompts without/with addition.

    ``result`` is a DirectionResult (its ``direction`` and ``layer`` are used); ``judge`` a judge name or object.
    """
    from refusal_probe.probe.hooks import ablate, add

    if not harmful_prompts or not harmless_prompts:
        raise UserError("validation needs at least one harmful and one harmless prompt")
    from refusal_probe.core.generate import generate_detailed

    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    j = _get_judge(judge)
    kw: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        stop=getattr(j, "has_keyword", None),
    )

    def run(prompts: list[str], desc: str) -> list[str]:
        return [g.text for g in generate_detailed(model, tokenizer, prompts, desc=desc, **kw)]

    harmful_base = run(harmful_prompts, "harmful, baseline")
    with ablate(model, result.direction):
        harmful_abl = run(harmful_prompts, "harmful, ablated")
    harmless_base = run(harmless_prompts, "harmless, baseline")
    with add(model, result.direction, result.layer):
        harmless_add = run(harmless_prompts, "harmless, added")

    def rate(texts: list[str]) -> float:
        return refusal_rate([j.is_refusal(t) for t in texts])

    before, after = rate(harmful_base), rate(harmful_abl)
    return {
        "format": FORMAT,
        "layer": int(result.layer),
        "position": int(result.position),
        "judge": getattr(j, "name", str(judge)),
        "judge_signature": getattr(j, "signature", ""),
        "decoding": f"greedy|max_new_tokens={max_new_tokens}|chat_template|early_exit={kw['stop'] is not None}",
        "n_harmful": len(harmful_prompts),
        "n_harmless": len(harmless_prompts),
        "harmful_refusal_rate": before,
        "harmful_refusal_rate_ablated": after,
        "harmful_relative_cut": relative_cut(before, after),
        "harmless_refusal_rate": rate(harmless_base),
        "harmless_refusal_rate_added": rate(harmless_add),
        # every response, so a reader can check the judge's verdicts (early exit cuts refusals at the keyword)
        "examples": {
            "harmful": [
                {"prompt": p, "baseline": a, "ablated": b, "refusal": [j.is_refusal(a), j.is_refusal(b)]}
                for p, a, b in zip(harmful_prompts, harmful_base, harmful_abl, strict=True)
            ],
            "harmless": [
                {"prompt": p, "baseline": a, "added": b, "refusal": [j.is_refusal(a), j.is_refusal(b)]}
                for p, a, b in zip(harmless_prompts, harmless_base, harmless_add, strict=True)
            ],
        },
    }


def save_validation(out_dir: str | Path, report: dict[str, Any]) -> Path:
    """Write ``validation.json`` (atomic)."""
    return write_json(Path(out_dir) / VALIDATION_JSON, report)
