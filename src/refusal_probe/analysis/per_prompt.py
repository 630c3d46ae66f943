"""Per-prompt internals on the eval's own AdvBench prompts: for every prompt `eval` judged, its projection on the
base's unit refusal direction (refusal layer, chosen position) and its refusal score (Arditi's refusal-token
log-odds at the last position), both from one forward pass, no generation. Joined to the eval's verdict they say
whether a prompt's own internals predict that it is refused (analysis/predict.py).

The prompts are read from ``<eval folder>/<run>/<checkpoint>/advbench.jsonl`` beside behaviour.csv (the folder
``eval`` writes, ``evaluate.results.eval_dir_for``); a folder that would lie outside the behaviour table's folder is
never read. Checkpoints without that file simply get no per-prompt rows (analyze says so in a note).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.core.io import read_jsonl

ADVBENCH = "advbench.jsonl"
COLUMNS = ("prompt_id", "refused", "label", "projection", "refusal_score")
HOW = (
    "one forward per AdvBench prompt of the eval (the analysis chat template, no system prompt): projection = "
    "resid_pre at the base's refusal layer and chosen position dotted with the base's unit refusal direction; "
    "refusal_score = log-odds of the refusal tokens' summed probability at the last position (Arditi et al., "
    "eps 1e-8); refused/label = the eval's verdict on that prompt's generated response"
)


@dataclass(frozen=True)
class EvalPrompts:
    """The judged AdvBench prompts of one checkpoint's eval folder."""

    path: Path
    ids: list[int]
    prompts: list[str]
    refused: list[bool]
    labels: list[str]

    @property
    def sha256(self) -> str:
        """What the per-prompt rows depend on: the prompts and their verdicts (a re-run eval changes it)."""
        payload = json.dumps([self.ids, self.prompts, self.refused, self.labels], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()


def eval_folder(beh_path: Path, ckpt) -> Path | None:
    """The checkpoint's eval result folder beside ``beh_path``, or None when it would lie outside that folder."""
    from refusal_probe.evaluate.results import eval_dir_for

    root = beh_path.parent.resolve()
    folder = eval_dir_for(beh_path.parent, ckpt)
    try:
        folder.resolve().relative_to(root)
    except ValueError:
        return None
    return folder


def read_eval_prompts(path: Path) -> EvalPrompts:
    """The records of one advbench.jsonl; a record without its prompt or verdict is one error naming its line."""
    ids: list[int] = []
    prompts: list[str] = []
    refused: list[bool] = []
    labels: list[str] = []
    for line, rec in read_jsonl(path):
        ok = (
            isinstance(rec, dict)
            and isinstance(rec.get("prompt"), str)
            and isinstance(rec.get("refusal"), bool)
        )
        if not ok:
            raise UserError(
                f"{path}: line {line} is not an eval record with a string 'prompt' and a boolean 'refusal'; "
                "re-run `refusal-probe eval` or pass --no-prompt-internals"
            )
        i = rec.get("i", len(ids))
        ids.append(int(i) if isinstance(i, int) and not isinstance(i, bool) else len(ids))
        prompts.append(rec["prompt"])
        refused.append(rec["refusal"])
        labels.append(str(rec.get("label", "")))
    return EvalPrompts(path, ids, prompts, refused, labels)


def find_eval_prompts(tree, beh_path: Path | None) -> dict[str, EvalPrompts]:
    """checkpoint key -> its judged AdvBench prompts, for every checkpoint of ``tree`` whose eval folder has them."""
    if beh_path is None:
        return {}
    out: dict[str, EvalPrompts] = {}
    for c in tree:
        folder = eval_folder(Path(beh_path), c)
        if folder is None or not (folder / ADVBENCH).is_file():
            continue
        found = read_eval_prompts(folder / ADVBENCH)
        if found.prompts:
            out[c.key] = found
    return out


def note(found: dict[str, EvalPrompts], tree, beh_path: Path | None) -> str | None:
    """A line for analyze's notes when some or all checkpoints have no per-prompt data."""
    n = len(list(tree))
    if not found:
        where = f"beside {beh_path}" if beh_path else "(no behaviour table)"
        return f"per-prompt: no {ADVBENCH} of `refusal-probe eval` {where}; prompts.csv is not written"
    if len(found) < n:
        return (
            f"per-prompt: {n - len(found)} of {n} checkpoint(s) have no {ADVBENCH}; they have no prompt rows"
        )
    return None


def measure(model, tok, prompts: EvalPrompts, unit, layer: int, position: int, batch_size: int) -> dict:
    """One forward over the prompts: per-prompt projection at (layer, position) and refusal score.

    Returned as the cache block {"sha256", "rows"} (rows: prompt_id, refused, label, projection, refusal_score).
    """
    import torch

    from refusal_probe.core.batching import model_device
    from refusal_probe.models.handle import decoder_layers
    from refusal_probe.probe.candidates import refusal_score
    from refusal_probe.probe.refusal_tokens import refusal_token_ids
    from refusal_probe.probe.scoring import encode_batches, last_logits

    batches = encode_batches(tok, prompts.prompts, batch_size, model_device(model))
    n = len(prompts.prompts)
    proj = torch.full((n,), math.nan, dtype=torch.float64)
    u = torch.as_tensor(unit).detach().to("cpu", torch.float64).flatten()
    seen: list[Any] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden[:, position, :].detach().to("cpu", torch.float64))

    block = decoder_layers(model)[layer]
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        logits = last_logits(model, batches)
    finally:
        handle.remove()
    if len(seen) != len(batches):
        raise RuntimeError(f"layer {layer} was read {len(seen)} times for {len(batches)} batches")
    for b, h in zip(batches, seen, strict=True):
        proj[b.index] = h @ u
    scores = refusal_score(logits, refusal_token_ids(tok))
    rows = [
        {
            "prompt_id": prompts.ids[i],
            "refused": prompts.refused[i],
            "label": prompts.labels[i],
            "projection": float(proj[i]),
            "refusal_score": float(scores[i]),
        }
        for i in range(n)
    ]
    return {"sha256": prompts.sha256, "rows": rows}


def current(block: Any, prompts: EvalPrompts | None) -> bool:
    """Whether a cached per-prompt block still matches the eval's prompts (True when none are wanted)."""
    if prompts is None:
        return True
    return (
        isinstance(block, dict)
        and block.get("sha256") == prompts.sha256
        and isinstance(block.get("rows"), list)
    )


def prompt_table(tree, refs, entries, ref_key) -> Any:
    """prompts table: one row per (checkpoint, prompt) {run, checkpoint, prompt_id, refused, label, projection,
    refusal_score, method, lr, step, fraction}; empty when no checkpoint has per-prompt rows."""
    import pandas as pd

    from refusal_probe.analysis.tables import checkpoint_meta

    rows: list[dict] = []
    for c in tree:
        block = refs[ref_key(c)].prompts if c.kind == "base" else entries.get(c.key, {}).get("prompts")
        if not isinstance(block, dict):
            continue
        meta = checkpoint_meta(c)
        rows += [{**meta, **r} for r in block.get("rows", [])]
    return pd.DataFrame(rows)


def entry_block(model, tok, result, batch_size: int, prompts: EvalPrompts | None) -> dict[str, Any]:
    """{"prompts": measured block} for a cache entry while the model is loaded, or {} when there are no prompts."""
    if prompts is None:
        return {}
    return {"prompts": measure(model, tok, prompts, result.unit, result.layer, result.position, batch_size)}
