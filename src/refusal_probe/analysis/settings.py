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
    progress: bool = opt(True, "progress bars")

    def n_extract(self) -> int:
        return self.n_prompts

    def check(self):
        super().check()
        if self.separability and self.n_prompts < SEPARABILITY_MIN:
            raise UserError(
                f"--n-prompts {self.n_prompts}: the separability probes hold out a quarter of the prompts and need "
                f"at least {SEPARABILITY_MIN} each; pass --n-prompts {SEPARABILITY_MIN} or more, or --no-separability"
            )
        return self

    def key_fields(self, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in self.RUNTIME + ignore}
        out["search"] = self.resolved_search()
        out["cache_format"] = CACHE_FORMAT
        for name in ("harmful", "harmless"):
            if out[name]:
                out[name] = {"sha256": sha256_file(Path(out[name]))}  # content, not where it lies
        return out
