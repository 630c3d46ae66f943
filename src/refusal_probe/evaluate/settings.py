"""EvalSettings: every `refusal-probe eval` setting, typed, with its help text as the documentation.

One source for the dataclass, the CLI flags (``EvalSettings.add_arguments``: the field's description is the --help
line, its default the shown default) and the validation, which runs when the settings are built, so bad values are
refused before any model is loaded. Runtime-only fields (device, batch size, progress bars) do not change the
numbers beyond float noise and are kept out of the settings hash that marks an evaluation finished.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from refusal_probe.core.devices import check_device
from refusal_probe.core.errors import UserError
from refusal_probe.core.settings import Settings, flag, opt
from refusal_probe.evaluate.judge import JUDGES

ADVBENCH_SIZE = 520
SEED_SUFFIX = "!"  # the study appended "!" to every AdvBench prompt
SEED_MAX_NEW_TOKENS = 256
DTYPES = ("float32", "bfloat16", "float16")
TRANSLATION_FORMATS = ("seed", "instructed")
TRANSLATION_SOURCES = ("ntrex", "mt-pref")
RUNTIME_ONLY = frozenset({"device", "batch_size", "progress"})


@dataclass
class EvalSettings(Settings):
    """What `eval` measures and how; built (and validated) by ``from_cli`` or directly in Python."""

    NOUN = "eval setting"

    judge: str = opt(
        "keywords",
        "Refusal judge: keywords (normalised, no false-positive traps) or seed-keywords (the study's 47 "
        "keywords, exactly).",
        JUDGES,
    )
    seed_faithful: bool = opt(
        False, "The study's generation: append '!' to each AdvBench prompt, 256 new tokens, no early exit."
    )
    n_advbench: int = opt(ADVBENCH_SIZE, f"First N AdvBench prompts (0-{ADVBENCH_SIZE}; 0 skips refusal).")
    n_translation: int = opt(200, "Held-out translation rows, balanced across languages (0 skips chrF).")
    translation_langs: list[str] = opt(
        ["de", "fr", "es", "it", "pt"], "Comma-separated source languages of the translation test set."
    )
    translation_format: str = opt(
        "seed",
        "User turn for translation: seed = the raw source text (the study), instructed = with the instruction "
        "'Translate the following <Language> text to English:'.",
        TRANSLATION_FORMATS,
    )
    translation_source: str = opt(
        "ntrex",
        "Held-out translation data: ntrex (bundled NTREX-128, split by document) or mt-pref (hub).",
        TRANSLATION_SOURCES,
    )
    xstest: bool = opt(
        False, "Also measure over-refusal on the 250 safe XSTest prompts (metric xstest_refusal_rate)."
    )
    max_new_tokens: int = opt(256, "New tokens per response.")
    early_exit: bool = opt(
        True,
        "Stop a refusal-set response once its verdict is settled (keyword matched or EOS); verdicts are "
        "identical, stored refusals are truncated.",
    )
    dtype: str = opt("float32", "Weights dtype.", DTYPES)
    # runtime only (RUNTIME_ONLY): not in the settings hash
    device: str = opt("cpu", "Torch device: cpu, cuda or cuda:N.")
    batch_size: int = opt(16, "Prompts per batch (halved automatically on out-of-memory).")
    progress: bool = opt(True, "Progress bars.")

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_cli(cls, values: dict[str, Any]) -> EvalSettings:
        """Settings from CLI strings (``core.settings.cli_values``); a value that does not fit names its flag."""
        typed = {k: cls.coerce(k, v, flag(k)) for k, v in values.items()}
        return cls.from_dict(typed, where="command line").validate()

    def hashed(self) -> dict[str, Any]:
        """The settings that change the numbers (what the settings hash and summary.json's "settings" hold)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_ONLY}

    def runtime(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in sorted(RUNTIME_ONLY)}

    def effective(self) -> EvalSettings:
        """--seed-faithful: the study's generation settings (256 new tokens, full length responses)."""
        if not self.seed_faithful:
            return self
        return dataclasses.replace(self, max_new_tokens=SEED_MAX_NEW_TOKENS, early_exit=False)

    @property
    def advbench_suffix(self) -> str:
        return SEED_SUFFIX if self.seed_faithful else ""

    def validate(self) -> EvalSettings:
        """Raise UserError naming the flag of the first bad value; return self for chaining."""
        from refusal_probe.data.translation import LANGUAGE_NAMES

        self.check_choices()
        if not 0 <= self.n_advbench <= ADVBENCH_SIZE:
            raise UserError(
                f"--n-advbench {self.n_advbench}: AdvBench has {ADVBENCH_SIZE} prompts; pass 0..{ADVBENCH_SIZE}"
            )
        if self.n_translation < 0:
            raise UserError(f"--n-translation {self.n_translation}: pass 0 (skip chrF) or a positive number")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens}: pass a positive number of tokens")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: pass a positive number")
        if self.n_translation and not self.translation_langs:
            raise UserError("--translation-langs is empty; pass e.g. de,fr,es,it,pt or --n-translation 0")
        unknown = [x for x in self.translation_langs if x not in LANGUAGE_NAMES]
        if unknown:
            raise UserError(
                f"--translation-langs {','.join(self.translation_langs)}: unknown language '{unknown[0]}'; "
                f"use codes from {', '.join(LANGUAGE_NAMES)}"
            )
        if not (self.n_advbench or self.n_translation or self.xstest):
            raise UserError(
                "nothing to measure: --n-advbench 0, --n-translation 0 and no --xstest; pass --n-advbench N, "
                "--n-translation N or --xstest"
            )
        check_device(self.device)
        return self
