"""On-policy DPO pairs: chosen = the reference translation, rejected = the base model's own greedy translation.

Generated once per (base model, rows, prompt format, length) and cached as JSONL under ``<out>/.cache/`` (hidden, so
checkpoint discovery skips it); every DPO run of a sweep over the same base reuses it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from refusal_probe.core.io import atomic_write
from refusal_probe.core.template import format_prompts
from refusal_probe.data.translation import format_translation_prompt, read_jsonl


def cache_path(out_dir: Path, base_revision: str, rows_digest: str, fmt: str, max_new_tokens: int) -> Path:
    key = hashlib.sha256(f"{base_revision}|{rows_digest}|{fmt}|{max_new_tokens}".encode()).hexdigest()[:16]
    return Path(out_dir) / ".cache" / f"onpolicy-{key}.jsonl"


def greedy_answers(
    model, tokenizer, user_turns: list[str], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy answers to single-turn chats, in input order (batched by length, left padding)."""
    import torch
    from tqdm.auto import tqdm

    texts = format_prompts(tokenizer, list(user_turns))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[str] = [""] * len(texts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="on-policy answers", unit="batch"):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            new = out[:, enc["input_ids"].shape[1] :]
            for i, ids in zip(idx, new, strict=True):
                answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def on_policy_pairs(
    rows: list[dict], model, tokenizer, fmt: str, cache: Path, max_new_tokens: int
) -> list[dict]:
    """Rows with chosen = ref and rejected = the model's greedy answer; rows whose answer equals the ref are dropped."""
    if cache.is_file():
        return read_jsonl(cache)
    turns = [format_translation_prompt(r["src"], r["src_lang"], fmt) for r in rows]
    answers = greedy_answers(model, tokenizer, turns, max_new_tokens)
    pairs = [
        {**r, "chosen": r["ref"], "rejected": a}
        for r, a in zip(rows, answers, strict=True)
        if a.strip() != r["ref"].strip()
    ]
    body = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    atomic_write(cache, lambda p: p.write_text(body, encoding="utf-8"))
    return pairs
