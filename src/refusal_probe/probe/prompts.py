"""The four prompt sets a direction is chosen with (train harmful/harmless for the mean difference, val harmful/
harmless for scoring), read and checked before any model is loaded, then sampled with the seed.

`directions` and `analyze` draw them the same way, so the same model and settings give the same prompts, the same
direction and the same entry in the shared direction cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from refusal_probe import data
from refusal_probe.core.errors import UserError
from refusal_probe.probe.select import sample_prompts

# set -> (source description, loader) of the bundled default
BUNDLED: dict[str, tuple[str, Callable[[], list[str]]]] = {
    "harmful_train": ("bundled:refusal_direction/harmful_train_no_advbench.json", data.harmful_train),
    "harmless_train": ("bundled:refusal_direction/harmless_train_first2048.json", data.harmless_train),
    "harmful_val": ("bundled:refusal_direction/harmful_val.json", data.harmful_val),
    "harmless_val": ("bundled:refusal_direction/harmless_val_first1024.json", data.harmless_val),
}


@dataclass
class PromptSets:
    prompts: dict[str, list[str]]  # set -> the sampled prompts
    sources: dict[str, str]  # set -> file or bundled name
    available: dict[str, int]  # set -> prompts the source holds

    def __getitem__(self, name: str) -> list[str]:
        return self.prompts[name]


def prompt_sets(
    n_extract: int,
    n_val: int,
    seed: int,
    harmful: str | None = None,
    harmless: str | None = None,
    n_flag: str = "--n-train",
) -> PromptSets:
    """Read (user files or bundled), check there are enough, and sample each set. UserError names file and flag."""
    files = {"harmful_train": (harmful, "--harmful"), "harmless_train": (harmless, "--harmless")}
    wanted = {
        "harmful_train": n_extract,
        "harmless_train": n_extract,
        "harmful_val": n_val,
        "harmless_val": n_val,
    }
    prompts: dict[str, list[str]] = {}
    sources: dict[str, str] = {}
    available: dict[str, int] = {}
    for name, n in wanted.items():
        path, file_flag = files.get(name, (None, None))
        count_flag = n_flag if name.endswith("train") else "--n-val"
        if path:
            items, source = data.load_prompts(path), str(path)
            if len(items) < n:
                raise UserError(
                    f"{path}: holds {len(items)} prompt{'' if len(items) == 1 else 's'}, but {count_flag} {n} needs at least {n}; pass "
                    f"{count_flag} {len(items)} or a {file_flag} file with more prompts"
                )
        else:
            source, load = BUNDLED[name]
            items = load()
            if len(items) < n:
                hint = f", or {file_flag} FILE with more" if file_flag else ""
                raise UserError(
                    f"{count_flag} {n}: the bundled {name} set ({source}) holds only "
                    f"{len(items)} prompts; pass {count_flag} {len(items)} or fewer{hint}"
                )
        prompts[name] = sample_prompts(items, n, seed)
        sources[name] = source
        available[name] = len(items)
    return PromptSets(prompts, sources, available)
