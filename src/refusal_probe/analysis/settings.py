"""Typed settings of `refusal-probe analyze`: each field's description is its --help line, its default exists only
here (or in the prompt settings it shares with `directions`), and ``check()`` names the flag of the first bad value."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from refusal_probe.core.errors import UserError
from refusal_probe.core.hashing import sha256_file
from refusal_probe.core.settings import opt
from refusal_probe.probe.settings import SEPARABILITY_MIN, PromptSettings

CACHE_FORMAT = "refusal-probe/analysis-cache/4"  # bump whenever a cached number changes meaning
MIN_BOOT_PROMPTS = 20  # fewer resamples do not give a 95% percentile interval worth printing


@dataclass
class AnalyzeSettings(PromptSettings):
    """Everything that changes the numbers (part of the cache key), plus how to run (``RUNTIME``: not part of it)."""

    NOUN = "analyze setting"
    N_FLAG = "--n-prompts"
    # prompt_internals: its cached rows carry the eval prompts' hash instead, so toggling it keeps the drift cache
    RUNTIME: ClassVar[tuple[str, ...]] = ("batch_size", "device", "progress", "prompt_internals")

    n_prompts: int = opt(128, "harmful and harmless prompts each for directions and drift")
    separability: bool = opt(True, "per-layer linear probes of harmful vs harmless activations")
    deltas: bool = opt(True, "weight deltas of every checkpoint against its base")
    prompt_internals: bool = opt(
        True, "per-prompt projection and refusal score on the AdvBench prompts eval judged (prompts.csv)"
    )
    causal: bool = opt(
        True, "causal drift: refusal score with the base/own direction ablated or added (forwards only)"
    )
    causal_layers: str = opt(
        "refusal", "layers for causal drift: refusal (the chosen layer), all, or a list such as 4,8,12"
    )
    progress: bool = opt(True, "progress bars")
    # noise floors (probe/noise.py); 0 turns one off
    n_boot_prompts: int = opt(200, "prompt resamples for the bootstrap interval on cos_to_base (0 = off)")
    n_split_halves: int = opt(20, "random half splits of the prompts for a split-half cosine floor (0 = off)")
    n_random_directions: int = opt(100, "random unit directions for the proj_gap chance control (0 = off)")

    def n_extract(self) -> int:
        return self.n_prompts

    def check(self):
        super().check()
        self.check_noise()
        if self.causal:
            from refusal_probe.probe.causal import check_layers_spec

            check_layers_spec(self.causal_layers)
        if self.separability and self.n_prompts < SEPARABILITY_MIN:
            raise UserError(
                f"--n-prompts {self.n_prompts}: the separability probes hold out a quarter of the prompts and need "
                f"at least {SEPARABILITY_MIN} each; pass --n-prompts {SEPARABILITY_MIN} or more, or --no-separability"
            )
        return self

    def check_noise(self) -> None:
        """The noise-floor counts: 0 (off) or enough for the measure to mean something."""
        for name, value, least in (
            ("--n-boot-prompts", self.n_boot_prompts, MIN_BOOT_PROMPTS),
            ("--n-split-halves", self.n_split_halves, 1),
            ("--n-random-directions", self.n_random_directions, 2),
        ):
            if value != 0 and value < least:
                raise UserError(f"{name} {value}: pass 0 (off) or at least {least}")
        if self.n_split_halves and self.n_prompts < 2:
            raise UserError(
                f"--n-prompts {self.n_prompts}: the split-half floor needs 2 prompts per class; pass --n-prompts 2 "
                "or more, or --n-split-halves 0"
            )

    def keep_per_prompt(self) -> bool:
        """Whether per-prompt activations must be kept (separability probes, split-half, bootstrap)."""
        return bool(self.separability or self.n_boot_prompts or self.n_split_halves)

    def key_fields(self, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in self.RUNTIME + ignore}
        out["search"] = self.resolved_search()
        out["cache_format"] = CACHE_FORMAT
        for name in ("harmful", "harmless"):
            if out[name]:
                out[name] = {"sha256": sha256_file(Path(out[name]))}  # content, not where it lies
        return out
