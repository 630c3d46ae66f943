"""The post-instruction tokens of a model's own chat template.

Arditi et al. read the refusal direction at the tokens between the end of the user's message and the start of the
answer (Llama-3: ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n``, Qwen:
``<|im_end|>\\n<|im_start|>assistant\\n``). Hand-written per-model strings go wrong on small details (one newline
instead of two), so we find these tokens by rendering the tokenizer's own template: they are the token ids that every
rendered prompt ends with, whatever the user wrote.
"""

from __future__ import annotations

from typing import Any

from refusal_probe.core.errors import UserError

# Different first and last characters and lengths, so the only tokens they share at the end are the template's.
_SENTINELS = ("Sentinel instruction alpha", "zz 42?", "Q")


def _require_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(
            f"tokenizer {name!r} has no chat template: pass a chat (instruct) model, "
            "or a tokenizer whose tokenizer_config.json sets `chat_template`"
        )


# Llama-3.x templates put today's date in the system header unless given one: fix it so prompts (and cached results)
# do not change from day to day. Templates that do not use it ignore the variable.
TEMPLATE_DATE = "26 Jul 2024"


def format_prompts(tokenizer: Any, prompts: list[str], system: str | None = None) -> list[str]:
    """Render each user message with the model's chat template, ending at the start of the assistant's answer."""
    _require_template(tokenizer)
    out = []
    for prompt in prompts:
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, date_string=TEMPLATE_DATE
        )
        if not isinstance(text, str):
            raise UserError(
                f"chat template of {tokenizer.name_or_path!r} did not render to text (got {type(text)})"
            )
        out.append(text)
    return out


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # add_special_tokens=False: the rendered template already carries BOS where the model wants one.
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _common_suffix(seqs: list[list[int]]) -> list[int]:
    n = 0
    shortest = min(len(s) for s in seqs)
    while n < shortest and all(s[-1 - n] == seqs[0][-1 - n] for s in seqs):
        n += 1
    return seqs[0][len(seqs[0]) - n :]


def post_instruction_ids(tokenizer: Any, system: str | None = None) -> list[int]:
    """Token ids every rendered prompt ends with: the template's tail after the user message."""
    ids = _ids(tokenizer, format_prompts(tokenizer, list(_SENTINELS), system=system))
    tail = _common_suffix(ids)
    if not tail:
        raise UserError(
            f"could not find post-instruction tokens in the chat template of {tokenizer.name_or_path!r}: "
            "rendered prompts share no final tokens; pass a chat model whose template ends with an assistant header"
        )
    return tail


def tokenize_prompts(
    tokenizer: Any, prompts: list[str], system: str | None = None
) -> tuple[list[list[int]], list[int]]:
    """Render and tokenise prompts; return their ids and the post-instruction ids, checked to end every prompt."""
    post = post_instruction_ids(tokenizer, system=system)
    ids = _ids(tokenizer, format_prompts(tokenizer, prompts, system=system))
    for i, seq in enumerate(ids):
        if len(seq) <= len(post) or seq[-len(post) :] != post:
            raise UserError(
                f"prompt {i} ({prompts[i][:40]!r}) does not end with the template's post-instruction tokens "
                f"{post} after tokenisation: its last characters merge with the template; strip or change them"
            )
    return ids, post
