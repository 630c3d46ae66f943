"""The prompt sets `eval` measures on: AdvBench (refusal), held-out translation rows (chrF), XSTest safe prompts
(over-refusal). Loaded once per eval, before any model, so a request the data cannot meet is refused up front."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.evaluate.settings import EvalSettings


@dataclass(frozen=True)
class PromptSets:
    advbench: list[str] = field(default_factory=list)
    translation: list[dict[str, Any]] = field(default_factory=list)  # {id, src, ref, src_lang, doc_id}
    xstest: list[str] = field(default_factory=list)


def prompt_sets(settings: EvalSettings) -> PromptSets:
    """Every set the settings ask for; too few held-out translation rows for --n-translation is refused."""
    rows = translation_rows(settings)
    if settings.n_translation and len(rows) < settings.n_translation:
        raise UserError(
            f"--n-translation {settings.n_translation}: the {settings.translation_source} test split holds "
            f"{len(rows)} rows for {','.join(settings.translation_langs)}; pass --n-translation {len(rows)} or less"
        )
    return PromptSets(
        advbench=advbench_prompts(settings),
        translation=rows,
        xstest=xstest_safe_prompts() if settings.xstest else [],
    )


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
