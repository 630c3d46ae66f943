"""Training examples: translation rows as SFT chats or DPO preference pairs, with the provenance run.json records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.data import translation as tdata
from refusal_probe.train.base import on_device
from refusal_probe.train.config import DpoPairs, TrainConfig, TrainData

DATASET_PAIRS = "dataset"  # the dataset's own preference pairs (mt-pref)


def pairs_kind(config: TrainConfig) -> str:
    if config.dpo_pairs != DpoPairs.AUTO:
        return str(config.dpo_pairs)
    return DATASET_PAIRS if config.train_data == TrainData.MT_PREF else DpoPairs.WMT.value


def training_examples(
    config: TrainConfig, model, tok, out_dir: Path, revision: str
) -> tuple[list[dict], dict]:
    """Chat examples for the trainer and the provenance to record (source, files, row hash)."""
    kind = pairs_kind(config) if config.method == "dpo" else None
    prov: dict[str, Any] = {
        "source": config.train_data,
        "split": "train",
        "langs": list(config.langs),
        "prompt_format": config.prompt_format,
    }
    if kind == DpoPairs.WMT:
        if "de" not in config.langs:
            raise UserError(
                "--dpo-pairs wmt: the bundled WMT pairs are German->English only; add de to --langs "
                "or use --dpo-pairs on-policy"
            )
        rows = tdata.wmt_pairs(config.n_train, config.seed)
        prov.update(source="wmt22+wmt23", langs=["de"])
    else:
        rows = tdata.translation_split(
            config.langs, "train", config.n_train, config.seed, config.train_data, config.include_nl
        )
    if kind == DpoPairs.ON_POLICY:
        from refusal_probe.train.onpolicy import cache_path, on_policy_pairs

        max_new = min(config.max_length // 2, 128)  # a sentence's translation; longer answers are cut anyway
        cache = cache_path(out_dir, revision, tdata.rows_sha256(rows), config.prompt_format, max_new)
        prov["on_policy_cache"] = str(cache)
        rows = on_policy_pairs(rows, on_device(model, config), tok, config.prompt_format, cache, max_new)
        if not rows:
            raise UserError("on-policy pairs: the base model reproduced every reference; nothing to prefer")
    if kind is not None:
        prov["dpo_pairs"] = kind
    wmt = kind == DpoPairs.WMT
    prov["files"] = tdata.source_files(
        "wmt" if wmt else config.train_data, config.langs, DpoPairs.WMT.value if wmt else None
    )
    prov["rows"] = len(rows)
    prov["rows_sha256"] = tdata.rows_sha256(rows)
    make = tdata.dpo_example if config.method == "dpo" else tdata.sft_example
    return [make(r, config.prompt_format) for r in rows], prov
