"""Translation data for training: the document split, prompts, balanced subsets, preference pairs, MT-Pref filter."""

from __future__ import annotations

from collections import Counter

import pytest

from refusal_probe.core.errors import UserError
from refusal_probe.data import translation as tdata


def test_prompt_formats_are_exact():
    assert tdata.format_translation_prompt("Guten Tag.", "de", "seed") == "Guten Tag."
    assert tdata.format_translation_prompt("Bonjour.", "fr", "instructed") == (
        "Translate the following French text to English:\n\nBonjour."
    )
    with pytest.raises(UserError):
        tdata.format_translation_prompt("x", "de", "chatty")


def test_split_is_deterministic_and_disjoint_by_document():
    langs = ["de", "fr", "es", "it", "pt"]
    train = tdata.translation_split(langs, "train")
    test = tdata.translation_split(langs, "test")
    assert train == tdata.translation_split(langs, "train")  # same call, same rows, same order
    train_docs = {r["doc_id"] for r in train}
    test_docs = {r["doc_id"] for r in test}
    assert train_docs and test_docs and not train_docs & test_docs
    # NTREX is one set of documents in every language: every language holds out the same documents
    for lang in langs:
        assert {r["doc_id"] for r in test if r["src_lang"] == lang} == test_docs
    assert len(train) + len(test) == 5 * 1997
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.25  # ~20% of sentences
    # a different seed reorders but never moves a row between the splits
    assert {r["id"] for r in tdata.translation_split(langs, "test", seed=7)} == {r["id"] for r in test}


def test_is_test_doc_is_a_fixed_hash():
    ids = [f"doc.{i}" for i in range(2000)]
    share = sum(tdata.is_test_doc(d) for d in ids) / len(ids)
    assert 0.17 < share < 0.23
    assert [tdata.is_test_doc(d) for d in ids[:50]] == [tdata.is_test_doc(d) for d in ids[:50]]


def test_subset_is_balanced_across_languages():
    rows = tdata.translation_split(["de", "fr"], "train", n=5, seed=1)
    assert [r["src_lang"] for r in rows] == ["de", "fr", "de", "fr", "de"]
    rows = tdata.translation_split(["de", "fr", "es", "it", "pt"], "train", n=12, seed=3)
    assert Counter(r["src_lang"] for r in rows) == {"de": 3, "fr": 3, "es": 2, "it": 2, "pt": 2}
    assert all(r["src"] and r["ref"] for r in rows)


def test_interleave_by_hand():
    out = tdata.interleave([[1, 2, 3], ["a"]], seed=0)
    # round robin: one from each group in turn, then the rest of the longer group
    assert out[1] == "a" and sorted([out[0], out[2], out[3]]) == [1, 2, 3]
    assert tdata.interleave([[1, 2, 3], ["a"]], seed=0) == out


def test_unknown_language_is_a_user_error():
    with pytest.raises(UserError, match="no bundled NTREX-128 file for 'xx'"):
        tdata.translation_split(["xx"], "train")


def test_chat_examples_have_prompt_and_completion_turns():
    row = {
        "src": "Hallo Welt",
        "ref": "Hello world",
        "src_lang": "de",
        "chosen": "Hello world",
        "rejected": "Hi",
    }
    assert tdata.sft_example(row) == {
        "prompt": [{"role": "user", "content": "Hallo Welt"}],
        "completion": [{"role": "assistant", "content": "Hello world"}],
    }
    ex = tdata.dpo_example(row, "instructed")
    assert ex["prompt"][0]["content"].startswith("Translate the following German text to English:")
    assert ex["chosen"] == [{"role": "assistant", "content": "Hello world"}]
    assert ex["rejected"] == [{"role": "assistant", "content": "Hi"}]


def test_best_worst_by_hand():
    cands = [
        {"text": "a", "chrf": 50.0},
        {"text": "b", "chrf": 90.0},
        {"text": "c", "chrf": 20.0},
        {"text": "d", "chrf": 90.0},
    ]
    best, worst = tdata.best_worst(cands)
    assert (best["text"], worst["text"]) == ("b", "c")  # first of the tied best wins
    assert (
        tdata.best_worst([{"text": "a", "chrf": 70.0}, {"text": "b", "chrf": 70.0}]) is None
    )  # tie: skipped
    assert tdata.best_worst([{"text": "same", "chrf": 80.0}, {"text": "same ", "chrf": 60.0}]) is None
    assert tdata.best_worst([{"text": "only", "chrf": 1.0}]) is None


def test_wmt_pairs_prefer_the_higher_chrf():
    pairs = tdata.wmt_pairs()
    assert len(pairs) > 2000  # 1,961 + 547 rows carry distinct candidates; ties are skipped
    assert all(p["chosen_chrf"] > p["rejected_chrf"] and p["chosen"] != p["rejected"] for p in pairs)
    assert {p["src_lang"] for p in pairs} == {"de"}
    assert tdata.wmt_pairs(n=10, seed=5) == tdata.wmt_pairs(n=10, seed=5)


def _mtpref_prompt(lang: str, text: str) -> str:
    return (
        f"<|im_start|>user\nTranslate the following {lang} source text to English:\n{lang}: {text}\n"
        "English: <|im_end|>\n<|im_start|>assistant\n"
    )


def test_mtpref_filter_keeps_latin_script_to_english():
    assert tdata.parse_mtpref_prompt(_mtpref_prompt("German", "Guten Morgen.")) == ("de", "Guten Morgen.")
    assert tdata.parse_mtpref_prompt(_mtpref_prompt("Dutch", "Goedemorgen.")) == ("nl", "Goedemorgen.")
    assert tdata.parse_mtpref_prompt(_mtpref_prompt("Russian", "Доброе утро.")) is None
    assert (
        tdata.parse_mtpref_prompt("Translate the following English source text to German:\nEnglish: x")
        is None
    )
    rows = tdata.mtpref_records(
        [
            {"prompt": _mtpref_prompt("French", "Bonjour."), "chosen": "Hello.", "rejected": "Good day."},
            {"prompt": _mtpref_prompt("Chinese", "你好"), "chosen": "Hello", "rejected": "Hi"},
        ]
    )
    assert [(r["src_lang"], r["src"], r["ref"], r["rejected"]) for r in rows] == [
        ("fr", "Bonjour.", "Hello.", "Good day.")
    ]


def test_study_split_holds_out_int_ratio_per_language():
    rows = [{"src_lang": "de", "i": i} for i in range(12)] + [{"src_lang": "fr", "i": i} for i in range(30)]
    train, test = tdata.study_split(rows)
    # int(12 * 0.167) = 2 German and int(30 * 0.167) = 5 French rows held out
    assert Counter(r["src_lang"] for r in test) == {"de": 2, "fr": 5}
    assert len(train) == 35
    assert tdata.study_split(rows) == (train, test)
    key = {(r["src_lang"], r["i"]) for r in train}
    assert not key & {(r["src_lang"], r["i"]) for r in test}


def test_mtpref_offline_names_the_bundled_alternative(monkeypatch):
    monkeypatch.setattr(tdata, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(UserError, match="--train-data ntrex"):
        tdata.mtpref_rows("train")


def test_source_files_are_hashed():
    files = tdata.source_files("ntrex", ["de"], dpo_pairs="wmt")
    assert set(files) == {"translation/ntrex128.de-en.jsonl", *tdata.WMT_FILES}
    assert files["translation/ntrex128.de-en.jsonl"].startswith("94b9847c1399bab5")  # PROVENANCE.md
