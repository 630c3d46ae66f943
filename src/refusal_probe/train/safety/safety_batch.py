"""The safety batch: harmful prompts paired with the BASE model's own refusals (or a user's prompt/response file).

Used by --gradient-surgery (its loss gives the safety gradient) and --ewc (the Fisher of its loss). The prompts are
the first N of the bundled harmful_train split, which holds no AdvBench prompt, so evaluation on AdvBench measures
what training never saw. The base's answers are generated once (greedy, core.generate) and cached in the run folder
(a resumed run reads them back). Tokenised with the model's own chat template, loss on the answer only, like the
task data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refusal_probe.core.batching import left_pad, model_device, pad_token_id, position_ids
from refusal_probe.core.errors import UserError
from refusal_probe.core.hashing import cache_key
from refusal_probe.core.io import read_json, read_jsonl, write_json
from refusal_probe.core.template import TEMPLATE_DATE, format_prompts

SAFETY_DIR = "safety"  # inside the run folder
BATCH_FILE = "safety_batch.json"


def harmful_prompts(n: int) -> list[str]:
    from refusal_probe.data import harmful_train

    return harmful_train()[:n]


def read_pairs(path: str | Path, flag: str = "--safety-pairs") -> list[dict[str, str]]:
    """{"prompt", "response"} records from a JSONL file, every line checked; one line names the first fault."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file; pass a JSONL file of prompt/response lines")
    pairs = []
    for number, row in read_jsonl(path, f"{flag} {path}"):
        ok = isinstance(row, dict) and all(
            isinstance(row.get(k), str) and row[k].strip() for k in ("prompt", "response")
        )
        if not ok:
            raise UserError(
                f'{flag} {path}: line {number} needs non-empty string fields "prompt" and "response"'
            )
        pairs.append({"prompt": row["prompt"], "response": row["response"]})
    if not pairs:
        raise UserError(f"{flag} {path}: holds no prompt/response lines; add at least one")
    return pairs


def base_pairs(model, tok, prompts: list[str], max_new_tokens: int, cache: Path, revision: str) -> list[dict]:
    """The base model's greedy answers to ``prompts``, generated once and cached (keyed by base, prompts, length)."""
    from refusal_probe.core.generate import generate

    key = cache_key(revision, prompts, max_new_tokens)
    if cache.is_file():
        try:
            doc = read_json(cache)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("key") == key:
            return list(doc["pairs"])
        print(f"{cache}: stale or corrupt safety batch, generated again")
    was_training = model.training
    model.eval()
    answers = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=8, progress=False)
    model.train(was_training)
    pairs = [{"prompt": p, "response": a} for p, a in zip(prompts, answers, strict=True) if a.strip()]
    if not pairs:
        raise UserError("safety batch: the base model gave an empty answer to every harmful prompt")
    write_json(cache, {"key": key, "revision": revision, "max_new_tokens": max_new_tokens, "pairs": pairs})
    return pairs


@dataclass
class SafetyBatch:
    """Tokenised safety pairs: left-padded ids, mask and labels (-100 outside the answer); one row per pair."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pairs: list[dict]
    source: str

    def __len__(self) -> int:
        return len(self.pairs)

    def rows(self, index: slice | list[int]) -> dict[str, torch.Tensor]:
        mask = self.attention_mask[index]
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": mask,
            "position_ids": position_ids(mask),
            "labels": self.labels[index],
        }

    def to_json(self) -> dict[str, Any]:
        n_tokens = int((self.labels != -100).sum())
        return {"source": self.source, "pairs": len(self.pairs), "answer_tokens": n_tokens}


def tokenize_pairs(tok, pairs: list[dict], max_length: int, source: str) -> SafetyBatch:
    """Each pair as the chat the trainer sees: the prompt rendered with the template, then the answer turn."""
    seqs, labels = [], []
    for pair in pairs:
        prompt_text = format_prompts(tok, [pair["prompt"]])[0]
        full_text = tok.apply_chat_template(
            [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair["response"]}],
            tokenize=False,
            date_string=TEMPLATE_DATE,
        )
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tok(full_text, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) <= len(prompt_ids):
            raise UserError(
                f"safety batch: the chat template does not extend the prompt {pair['prompt'][:40]!r}"
            )
        full_ids = full_ids[:max_length]
        if len(full_ids) <= len(prompt_ids):
            continue  # the prompt alone fills max_length: nothing to learn from
        seqs.append(full_ids)
        labels.append([-100] * len(prompt_ids) + full_ids[len(prompt_ids) :])
    if not seqs:
        raise UserError(f"safety batch: every prompt is longer than --max-length {max_length}; raise it")
    ids, mask = left_pad(seqs, pad_token_id(tok))
    lab, _ = left_pad(labels, -100)
    return SafetyBatch(ids, mask, lab, pairs[: len(seqs)], source)


def build_safety_batch(config, model, tok, run_dir: Path, revision: str) -> SafetyBatch:
    """The run's safety batch: the user's file, or the base's own answers to N harmful_train prompts (cached)."""
    if config.safety_pairs:
        pairs = read_pairs(config.safety_pairs)
        source = str(Path(config.safety_pairs).expanduser().resolve())
    else:
        prompts = harmful_prompts(config.safety_prompts)
        cache = Path(run_dir) / SAFETY_DIR / BATCH_FILE
        pairs = base_pairs(model, tok, prompts, config.safety_max_new_tokens, cache, revision)
        source = str(cache)
    return tokenize_pairs(tok, pairs, config.max_length, source)


def safety_loss(model, batch: SafetyBatch, index: slice | list[int] | None = None) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of the chosen rows (all by default)."""
    rows = batch.rows(slice(None) if index is None else index)
    device = model_device(model)
    rows = {k: v.to(device) for k, v in rows.items()}
    labels = rows.pop("labels")
    logits = model(**rows, use_cache=False).logits[:, :-1].float()
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
    )
