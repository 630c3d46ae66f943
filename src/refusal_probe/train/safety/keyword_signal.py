"""The safety monitor's optional second signal: keyword refusal rate on a small harmful set, generated greedily.

The projection signal reads the refusal direction; this one reads behaviour, the quantity the evaluation reports,
so a run whose refusals go while the projection holds (or the other way round) is still caught. It is the
evaluation's own measurement at a small scale: core.generate's batched greedy decoding with its early exit (a
sequence stops when the judge's keyword test is true, which for the keyword judge is monotone, so the verdicts
equal full-length generation's), judged by evaluate.judge's keyword judge. The model is measured in eval mode
without gradients and returned to the mode it was in.
"""

from __future__ import annotations

from typing import Any

import torch

JUDGE = "keywords"  # the evaluation's default judge


def keyword_refusal(model, tokenizer, prompts: list[str], judge: Any, max_new_tokens: int) -> float:
    """Share of ``prompts`` whose greedy answer (up to ``max_new_tokens``) ``judge.is_refusal`` calls a refusal."""
    from refusal_probe.core.generate import generate

    if not prompts:
        return float("nan")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            texts = generate(
                model,
                tokenizer,
                prompts,
                max_new_tokens=max_new_tokens,
                batch_size=len(prompts),
                stop=judge.has_keyword,
                progress=False,
            )
    finally:
        model.train(was_training)
    return sum(bool(judge.is_refusal(t)) for t in texts) / len(texts)
