"""Typed settings of `directions` (and the prompt and capture settings `analyze` shares with it).

Each field's description is its --help line and its default exists only here (the selection rules' defaults live in
:class:`SelectionRules`); closed vocabularies (search, backend, validation set,
dtype) are enums or registries that the CLI's choices come from. ``check()`` names the flag of the first bad value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from refusal_probe.core.devices import check_device
from refusal_probe.core.errors import UserError
from refusal_probe.core.settings import Settings, flag, opt
from refusal_probe.evaluate.judge import JUDGES
from refusal_probe.probe import DEFAULT_BATCH_SIZE, DEFAULT_SEED

# the separability probes hold out this fraction of each class; both splits need a prompt of each class
SEPARABILITY_TEST_FRACTION = 0.25
SEPARABILITY_MIN = 4  # = ceil(1 / 0.25): the fewest prompts per class that leave one in the test split


@dataclass(frozen=True)
class SelectionRules:
    """How candidates are filtered and searched; the one place their defaults live (Arditi et al.'s values)."""

    max_layer_fraction: float = 0.8  # candidates from layers >= floor(this * L) are filtered
    kl_threshold: float = 0.1  # ablation KL on harmless prompts above this is filtered
    induce_threshold: float = 0.0  # steering score below this is filtered
    skip_late_layers: bool = False  # do not score the layers the layer rule discards anyway
    top_layers: int = 3  # coarse search: layers whose every position is scored

    def to_json(self) -> dict[str, Any]:
        return {
            "max_layer_fraction": self.max_layer_fraction,
            "kl_threshold": self.kl_threshold,
            "induce_threshold": self.induce_threshold,
            "skip_late_layers": self.skip_late_layers,
            "top_layers": self.top_layers,
        }


DEFAULT_RULES = SelectionRules()


class Search(str, Enum):
    """How many direction candidates are scored."""

    AUTO = "auto"  # full on CUDA, coarse on CPU
    FULL = "full"  # every (layer, position)
    COARSE = "coarse"  # the last position at every layer, then every position at the best layers

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(s.value for s in cls)


def resolved_search(search: str, device: str) -> str:
    """``auto`` -> ``full`` on CUDA, ``coarse`` elsewhere (scoring every candidate on a CPU takes hours)."""
    if search != Search.AUTO.value:
        return Search(search).value
    return Search.FULL.value if str(device).startswith("cuda") else Search.COARSE.value


# activation capture backends (refusal_probe.probe.activations checks the same tuple)
BACKENDS = ("hooks", "transformer-lens")
DTYPES = ("float32", "bfloat16", "float16")


def _advbench() -> list[str]:
    from refusal_probe import data

    return data.advbench()


def _harmful_test() -> list[str]:
    from refusal_probe import data

    return data.harmful_test()


# --validate-set: name -> (where it comes from, loader)
VALIDATE_SETS: dict[str, tuple[str, Callable[[], list[str]]]] = {
    "advbench": ("bundled:advbench/harmful_behaviors.csv", _advbench),
    "harmful_test": ("bundled:refusal_direction/harmful_test.json", _harmful_test),
}


@dataclass
class PromptSettings(Settings):
    """What `directions` and `analyze` both read prompts and capture activations with."""

    NOUN = "setting"

    n_val: int = opt(32, "held-out harmful and harmless prompts each for scoring direction candidates")
    harmful: str | None = opt(
        None,
        "harmful prompt file (.txt/.csv/.json/.jsonl) for extraction; default: bundled harmful_train "
        "without its AdvBench items",
    )
    harmless: str | None = opt(
        None,
        "harmless prompt file (.txt/.csv/.json/.jsonl) for extraction; default: bundled Alpaca harmless_train",
    )
    layer: int | None = opt(None, "use the candidates of this layer only (with --position: no choice)")
    position: int | None = opt(None, "use the candidates at this post-instruction position only (-P..-1)")
    search: str = opt(
        Search.AUTO.value,
        "score every (layer, position) candidate (full), or the last position at every layer then all positions "
        "at the 3 best layers (coarse, ~4x cheaper); auto = full on CUDA, coarse on CPU",
        Search.values(),
    )
    backend: str = opt(
        BACKENDS[0], "how activations are captured: forward hooks or transformer-lens 4", BACKENDS
    )
    batch_size: int = opt(DEFAULT_BATCH_SIZE, "prompts per forward pass / generate call")
    device: str = opt("cpu", "torch device: cpu, cuda, cuda:1, ...")
    seed: int = opt(DEFAULT_SEED, "seed for sampling the prompt subsets")

    N_FLAG = "--n-train"  # the flag of the extraction prompt count (analyze calls it --n-prompts)

    def n_extract(self) -> int:
        raise NotImplementedError

    def resolved_search(self) -> str:
        return resolved_search(self.search, self.device)

    def check(self):
        """Raise UserError naming the flag of the first bad value; return self."""
        _require(self.n_extract() >= 1, self.N_FLAG, self.n_extract(), "must be at least 1")
        _require(self.n_val >= 1, "--n-val", self.n_val, "must be at least 1")
        _require(self.batch_size >= 1, "--batch-size", self.batch_size, "must be at least 1")
        _require(
            self.position is None or self.position < 0,
            "--position",
            self.position,
            "must be negative (-P..-1)",
        )
        check_device(self.device)
        self.check_choices()
        return self


@dataclass
class DirectionsSettings(PromptSettings):
    """Every setting of `refusal-probe directions`."""

    NOUN = "directions setting"

    n_train: int = opt(128, "harmful and harmless prompts each for the mean difference")
    max_layer_fraction: float = opt(
        SelectionRules.max_layer_fraction, "discard candidates from layers >= floor(this * layers)"
    )
    kl_threshold: float = opt(
        SelectionRules.kl_threshold, "discard candidates whose ablation KL exceeds this"
    )
    induce_threshold: float = opt(
        SelectionRules.induce_threshold, "discard candidates whose steering score is below this"
    )
    skip_late_layers: bool = opt(
        SelectionRules.skip_late_layers,
        "do not score the layers --max-layer-fraction discards anyway (saves about 20%% of the scoring time)",
    )
    refusal_tokens: str | None = opt(
        None,
        'comma-separated refusal openers whose first token is scored, e.g. "I,Sorry" (default: a built-in list)',
    )
    dtype: str = opt(DTYPES[0], "weights dtype (float32 on CPU)", DTYPES)
    fresh: bool = opt(
        False, "recompute candidate scores even when the direction cache holds them for these settings"
    )
    validate: bool = opt(False, "also generate and judge refusal with/without intervention")
    validate_set: str = opt(
        "advbench",
        "held-out harmful prompts for --validate: advbench (the study's 520; extraction uses the harmful_train "
        "split without its AdvBench items) or harmful_test (JailbreakBench, HarmBench test, StrongREJECT: harder)",
        tuple(sorted(VALIDATE_SETS)),
    )
    n_validate: int = opt(
        64,
        "prompts each for --validate, disjoint from extraction and selection: harmful from --validate-set, "
        "harmless from harmless_val minus the selection sample",
    )
    max_new_tokens: int = opt(64, "tokens generated per answer with --validate")
    judge: str = opt(JUDGES[0], "refusal judge for --validate", JUDGES)
    quiet: bool = opt(False, "no progress bars")

    def n_extract(self) -> int:
        return self.n_train

    def rules(self) -> SelectionRules:
        return SelectionRules(
            max_layer_fraction=self.max_layer_fraction,
            kl_threshold=self.kl_threshold,
            induce_threshold=self.induce_threshold,
            skip_late_layers=self.skip_late_layers,
        )

    def check(self):
        super().check()
        _require(
            0 < self.max_layer_fraction <= 1,
            "--max-layer-fraction",
            self.max_layer_fraction,
            "must be in (0, 1]",
        )
        _require(self.max_new_tokens >= 1, "--max-new-tokens", self.max_new_tokens, "must be at least 1")
        _require(self.n_validate >= 1, "--n-validate", self.n_validate, "must be at least 1")

        if self.refusal_tokens is not None:
            from refusal_probe.probe.refusal_tokens import parse_phrases

            parse_phrases(self.refusal_tokens)
        return self


def _require(ok: bool, name: str, value, what: str) -> None:
    if not ok:
        raise UserError(f"{name} {value} {what}")


def build(cls, values: dict):
    """Settings of ``cls`` from CLI values (strings, as given), coerced per field and validated."""
    coerced = {k: cls.coerce(k, v, flag(k)) for k, v in values.items()}
    return cls.from_dict(coerced, where="command line").check()
