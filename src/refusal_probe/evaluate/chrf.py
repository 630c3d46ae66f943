"""Corpus chrF exactly as the study computed it: sacrebleu ``CHRF()`` defaults (chrF2, character 6-grams, no word
n-grams, i.e. not chrF++), one reference per segment. The signature travels with every score."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from refusal_probe.core.errors import UserError


@dataclass(frozen=True)
class ChrfResult:
    score: float  # 0..100
    signature: str  # sacrebleu's, e.g. "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0"
    n: int


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> ChrfResult:
    """Corpus-level chrF of ``hypotheses`` against one reference each (None counts as an empty string)."""
    from sacrebleu.metrics import CHRF

    if len(hypotheses) != len(references):
        raise UserError(
            f"chrF needs one reference per hypothesis: got {len(hypotheses)} and {len(references)}"
        )
    if not hypotheses:
        raise UserError("chrF of an empty corpus is undefined; pass at least one hypothesis/reference pair")
    metric = CHRF()
    hyps = ["" if h is None else str(h) for h in hypotheses]
    refs = ["" if r is None else str(r) for r in references]
    score = metric.corpus_score(hyps, [refs]).score
    return ChrfResult(score=float(score), signature=chrf_signature(metric), n=len(hyps))


def chrf_signature(metric=None) -> str:
    """sacrebleu's signature string of the default ``CHRF()`` (or of ``metric``)."""
    if metric is None:
        from sacrebleu.metrics import CHRF

        metric = CHRF()
    return "chrF2|" + str(metric.get_signature())
