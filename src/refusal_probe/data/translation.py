"""Translation training data (X -> English) and DPO preference pairs, as chat examples for TRL.

Offline default: NTREX-128 (bundled), split into train and held-out test BY DOCUMENT: a document's sentences are
all train or all test, decided by a hash of its doc_id. NTREX translates the same English documents into every
language, so the test documents are the same in every language and no test reference is ever seen in training
through another language. Hub source: sardinelab/MT-pref, filtered and split exactly as the study did.

Examples are conversational prompt/completion records; TRL renders them with the model's OWN chat template and
computes the loss on the completion (answer) tokens only.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.core.hashing import sha256_file
from refusal_probe.data import bundled

LANGUAGE_NAMES = {
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
}
STUDY_LANGS = ("de", "fr", "es", "it", "pt")
TEST_PERCENT = (
    20  # share of NTREX documents held out (by doc_id hash): 25 of 123 documents, 19.5% of sentences
)
MTPREF_ID = "sardinelab/MT-pref"
WMT_FILES = ("translation/wmt22.de-en.jsonl", "translation/wmt23.de-en.jsonl")

# The study's filter (safety-degradation-finetuning, dataset_filtering.py): MT-Pref prompts of the form
# "Translate the following <Language> source text to English:\n<Language>: <text>\nEnglish: <|im_end|>", kept when
# the language writes in Latin script. Codes for the languages that list names.
MTPREF_PROMPT = re.compile(
    r"Translate the following (\w+) source text to English:\s*\1:\s*(.*?)\s*English:\s*<\|im_end\|>",
    re.DOTALL | re.IGNORECASE,
)
LATIN_SCRIPT = {
    "german": "de",
    "spanish": "es",
    "french": "fr",
    "portuguese": "pt",
    "italian": "it",
    "dutch": "nl",
    "english": "en",
    "catalan": "ca",
    "galician": "gl",
    "romanian": "ro",
    "polish": "pl",
    "czech": "cs",
    "slovak": "sk",
    "slovenian": "sl",
    "croatian": "hr",
    "bosnian": "bs",
    "serbian": "sr",
    "albanian": "sq",
    "latvian": "lv",
    "lithuanian": "lt",
    "estonian": "et",
    "finnish": "fi",
    "hungarian": "hu",
    "danish": "da",
    "swedish": "sv",
    "norwegian": "no",
    "icelandic": "is",
}
STUDY_TEST_RATIO = 0.167  # the study held out int(0.167 * n) rows per language, shuffled with random.seed(42)


# ---- prompts and chat examples ----


def format_translation_prompt(src: str, lang: str, fmt: str = "seed") -> str:
    """The user turn. seed: the raw source text (the study: no instruction); instructed: with an instruction."""
    if fmt == "seed":
        return src
    if fmt == "instructed":
        return f"Translate the following {LANGUAGE_NAMES.get(lang, lang)} text to English:\n\n{src}"
    raise UserError(f"prompt format '{fmt}' is unknown; use seed or instructed")


def sft_example(row: dict, fmt: str = "seed") -> dict[str, list[dict[str, str]]]:
    """A conversational prompt/completion record: loss falls on the completion (the reference) only."""
    return {
        "prompt": [{"role": "user", "content": format_translation_prompt(row["src"], row["src_lang"], fmt)}],
        "completion": [{"role": "assistant", "content": row["ref"]}],
    }


def dpo_example(row: dict, fmt: str = "seed") -> dict[str, list[dict[str, str]]]:
    """A conversational preference record (prompt, chosen, rejected)."""
    return {
        "prompt": [{"role": "user", "content": format_translation_prompt(row["src"], row["src_lang"], fmt)}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


# ---- NTREX-128 (bundled) ----


def is_test_doc(doc_id: str, test_percent: int = TEST_PERCENT) -> bool:
    """Whether a document is held out: a fixed hash of its id, so membership never depends on other documents."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h % 100 < test_percent


def ntrex_file(lang: str) -> Path:
    path = bundled(f"translation/ntrex128.{lang}-en.jsonl")
    if not path.is_file():
        have = sorted(p.name.split(".")[1].split("-")[0] for p in path.parent.glob("ntrex128.*-en.jsonl"))
        raise UserError(f"no bundled NTREX-128 file for '{lang}'; bundled languages: {', '.join(have)}")
    return path


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def interleave(groups: Sequence[Sequence[Any]], seed: int) -> list[Any]:
    """Shuffle each group with ``seed``, then take one from each in turn: any prefix is balanced across groups."""
    shuffled = []
    for i, group in enumerate(groups):
        items = list(group)
        random.Random(f"{seed}:{i}").shuffle(items)
        shuffled.append(items)
    out = []
    for k in range(max((len(g) for g in shuffled), default=0)):
        out += [g[k] for g in shuffled if k < len(g)]
    return out


def translation_split(
    langs: Iterable[str] = STUDY_LANGS,
    split: str = "train",
    n: int | None = None,
    seed: int = 42,
    source: str = "ntrex",
    include_nl: bool = False,
) -> list[dict]:
    """Rows {id, src, ref, src_lang, doc_id[, rejected]} of one split, balanced across languages, first ``n``.

    The split itself never depends on ``seed`` (the test set is the same for every run); ``seed`` only orders the rows.
    """
    if split not in ("train", "test"):
        raise UserError(f"split '{split}' is unknown; use train or test")
    langs = list(dict.fromkeys(langs))
    if source == "ntrex":
        groups = []
        for lang in langs:
            rows = [r for r in read_jsonl(ntrex_file(lang)) if is_test_doc(r["doc_id"]) == (split == "test")]
            groups.append(rows)
    elif source == "mt-pref":
        keep = langs + (["nl"] if include_nl and "nl" not in langs else [])
        by_lang: dict[str, list[dict]] = defaultdict(list)
        for r in mtpref_rows(split):
            by_lang[r["src_lang"]].append(r)
        groups = [by_lang[lang] for lang in keep]
    else:
        raise UserError(f"translation data '{source}' is unknown; use ntrex (bundled) or mt-pref (hub)")
    out = interleave(groups, seed)
    if not out:
        raise UserError(f"no {source} {split} rows for languages {','.join(langs)}")
    return out[:n] if n is not None else out


# ---- MT-Pref (hub) ----


def parse_mtpref_prompt(prompt: str) -> tuple[str, str] | None:
    """(language code, source text) of an X->English MT-Pref prompt in a Latin-script language, else None."""
    m = MTPREF_PROMPT.search(prompt)
    if not m:
        return None
    code = LATIN_SCRIPT.get(m.group(1).lower())
    return (code, m.group(2).strip()) if code else None


def study_split(
    rows: list[dict], test_ratio: float = STUDY_TEST_RATIO, seed: int = 42
) -> tuple[list[dict], list[dict]]:
    """The study's split, step for step: group by language (first-seen order), random.seed(seed), shuffle each group,
    hold out int(n * ratio) (at least 1), then shuffle both sets. Reproduces its held-out rows from the same input."""
    rng_state = random.getstate()
    try:
        random.seed(seed)
        by_lang: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_lang[r["src_lang"]].append(r)
        train, test = [], []
        for examples in by_lang.values():
            examples = list(examples)
            random.shuffle(examples)
            n_test = max(1, int(len(examples) * test_ratio))
            test += examples[:n_test]
            train += examples[n_test:]
        random.shuffle(train)
        random.shuffle(test)
        return train, test
    finally:
        random.setstate(rng_state)


def mtpref_records(records: Iterable[dict]) -> list[dict]:
    """MT-Pref rows (prompt, chosen, rejected) -> our rows, keeping X->English Latin-script sources as the study did."""
    out = []
    for i, ex in enumerate(records):
        parsed = parse_mtpref_prompt(str(ex.get("prompt", "")))
        if parsed is None or parsed[0] == "en":
            continue
        lang, src = parsed
        out.append(
            {
                "id": f"mtpref-{i}",
                "src": src,
                "ref": ex["chosen"],
                "chosen": ex["chosen"],
                "rejected": ex["rejected"],
                "src_lang": lang,
                "doc_id": f"mtpref-{i}",
            }
        )
    return out


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connect (fast); without this, datasets retries for about 30 s when offline."""
    import os
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_offline(offline: bool):
    """Read only the local datasets cache while ``offline`` (a cached MT-Pref still loads without a network)."""
    if not offline:
        yield
        return
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def mtpref_rows(split: str) -> list[dict]:
    """One split of MT-Pref from the hub (cached by datasets), filtered and split as the study did."""
    try:
        from datasets import load_dataset

        with _hub_offline(not hub_reachable()):
            ds = load_dataset(MTPREF_ID, split="train")
    except Exception as exc:  # offline, missing, gated: one piece of advice
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(
            f"cannot load {MTPREF_ID} from the Hugging Face hub ({reason}); use the bundled offline data instead: "
            "--train-data ntrex"
        ) from None
    train, test = study_split(mtpref_records(ds))
    return train if split == "train" else test


# ---- DPO pairs from WMT system outputs (bundled) ----


def best_worst(candidates: Sequence[dict]) -> tuple[dict, dict] | None:
    """(highest-chrF, lowest-chrF) candidate; None when every candidate scores the same or the texts are equal.
    Among equal scores the first in order wins, so the choice is deterministic."""
    scored = [c for c in candidates if c.get("chrf") is not None and str(c.get("text", "")).strip()]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda c: c["chrf"])
    worst = min(scored, key=lambda c: c["chrf"])
    if best["chrf"] == worst["chrf"] or best["text"].strip() == worst["text"].strip():
        return None
    return best, worst


def wmt_pairs(n: int | None = None, seed: int = 42) -> list[dict]:
    """German->English preference rows from WMT22+23: chosen = best system output by sentence chrF, rejected = worst."""
    rows = []
    for rel in WMT_FILES:
        for r in read_jsonl(bundled(rel)):
            pair = best_worst(r.get("candidates", []))
            if pair is None:
                continue
            rows.append(
                {
                    "id": r["id"],
                    "src": r["src"],
                    "ref": r.get("ref"),
                    "src_lang": r.get("src_lang", "de"),
                    "chosen": pair[0]["text"],
                    "rejected": pair[1]["text"],
                    "chosen_chrf": pair[0]["chrf"],
                    "rejected_chrf": pair[1]["chrf"],
                }
            )
    rows = interleave([rows], seed)
    return rows[:n] if n is not None else rows


# ---- provenance ----


def rows_sha256(rows: Iterable[dict]) -> str:
    """Content hash of the exact rows used (order included)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def source_files(source: str, langs: Iterable[str], dpo_pairs: str | None = None) -> dict[str, str]:
    """{bundled file: sha256} for the files a run reads (hub data is identified by rows_sha256 instead)."""
    rels = [f"translation/ntrex128.{lang}-en.jsonl" for lang in langs] if source == "ntrex" else []
    if dpo_pairs == "wmt":
        rels += list(WMT_FILES)
    return {rel: sha256_file(bundled(rel)) for rel in rels}
