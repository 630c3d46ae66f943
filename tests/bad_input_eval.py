"""Bad-input cases of `eval` (settings, device, output folder, shards) and `score` (response files), all refused
with one line before any model is loaded."""

from __future__ import annotations

import fcntl
import json

from badinput import Case, Workspace

SMALL = ["--n-advbench", "1", "--n-translation", "0", "--max-new-tokens", "2", "--no-progress"]
_HELD: list = []  # lock handles kept open for the length of the session (another run "holds" the output)


def _locked(ws: Workspace):
    ws.out.mkdir(parents=True, exist_ok=True)
    handle = open(ws.out / ".lock", "a+")  # noqa: SIM115 - held on purpose
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write("pid 4242")
    handle.flush()
    _HELD.append(handle)
    return ws.run()


def _default_out_blocked(ws: Workspace):
    """The default output <run>/eval cannot be created (a file holds its name): as for a read-only tree."""
    run = ws.run()
    ws.file("runs/full-lr1e-4/eval", "not a folder")
    return run


def _eval(ws: Workspace, *flags) -> list:
    return ["eval", ws.run(), "--out", ws.out, *flags]


def _responses(ws: Workspace, name: str = "r.jsonl", text: str | bytes | None = None):
    rows = [{"response": "I'm sorry, I cannot.", "prompt": "Say hi", "g": "a"}]
    return ws.file(name, text if text is not None else "".join(json.dumps(r) + "\n" for r in rows))


def _score(ws: Workspace, path, *flags) -> list:
    return ["score", "refusal", path, "--text-column", "response", *flags]


CASES = [
    # ---- eval: settings, each naming its flag
    Case(
        "eval-nothing-to-measure",
        lambda ws: _eval(ws, "--n-advbench", "0", "--n-translation", "0"),
        ("nothing to measure", "--n-advbench 0", "--n-translation 0", "--xstest"),
    ),
    Case(
        "eval-n-advbench-negative", lambda ws: _eval(ws, "--n-advbench", "-1"), ("--n-advbench -1", "0..520")
    ),
    Case(
        "eval-n-advbench-too-many", lambda ws: _eval(ws, "--n-advbench", "521"), ("--n-advbench 521", "520")
    ),
    Case(
        "eval-n-advbench-not-a-number",
        lambda ws: _eval(ws, "--n-advbench", "many"),
        ("--n-advbench", "'many'", "int"),
    ),
    Case(
        "eval-n-translation-negative", lambda ws: _eval(ws, "--n-translation", "-5"), ("--n-translation -5",)
    ),
    Case(
        "eval-n-translation-more-than-held-out",
        lambda ws: _eval(ws, "--n-translation", "100000"),
        ("--n-translation 100000", "test split holds", "or less"),
    ),
    Case("eval-batch-size-zero", lambda ws: _eval(ws, *SMALL, "--batch-size", "0"), ("--batch-size 0",)),
    Case(
        "eval-batch-size-negative", lambda ws: _eval(ws, *SMALL, "--batch-size", "-2"), ("--batch-size -2",)
    ),
    Case(
        "eval-max-new-tokens-zero",
        lambda ws: _eval(ws, "--n-advbench", "1", "--max-new-tokens", "0"),
        ("--max-new-tokens 0",),
    ),
    Case(
        "eval-translation-langs-unknown",
        lambda ws: _eval(ws, "--translation-langs", "de,xx"),
        ("--translation-langs de,xx", "'xx'", "de, fr"),
    ),
    Case(
        "eval-translation-langs-empty",
        lambda ws: _eval(ws, "--translation-langs", ","),
        ("--translation-langs is empty", "--n-translation 0"),
    ),
    Case(
        "eval-judge-unknown",
        lambda ws: _eval(ws, "--judge", "gpt4"),
        ("--judge", "invalid choice", "keywords"),
    ),
    Case("eval-dtype-unknown", lambda ws: _eval(ws, "--dtype", "int8"), ("--dtype", "invalid choice")),
    # ---- eval: device, before any model is loaded
    Case(
        "eval-device-banana",
        lambda ws: _eval(ws, *SMALL, "--device", "banana"),
        ("--device banana", "not a torch device", "cpu"),
    ),
    Case(
        "eval-device-cuda-without-cuda",
        lambda ws: _eval(ws, *SMALL, "--device", "cuda"),
        ("--device cuda", "CUDA is not available", "--device cpu"),
        env=(("CUDA_VISIBLE_DEVICES", ""),),
    ),
    # ---- eval: shards
    Case(
        "eval-shard-out-of-range",
        lambda ws: _eval(ws, *SMALL, "--shard", "2/2"),
        ("--shard 2/2", "0 <= i < n"),
    ),
    Case("eval-shard-negative", lambda ws: _eval(ws, *SMALL, "--shard", "-1/2"), ("--shard -1/2",)),
    Case("eval-shard-not-a-fraction", lambda ws: _eval(ws, *SMALL, "--shard", "half"), ("--shard half",)),
    # ---- eval: the output folder
    Case(
        "eval-default-out-unwritable",
        lambda ws: ["eval", _default_out_blocked(ws), *SMALL],
        ("--out", "full-lr1e-4/eval", "cannot write there", "pass --out DIR"),
    ),
    Case(
        "eval-out-unwritable",
        lambda ws: ["eval", ws.run(), "--out", ws.file("notes.txt", "hi") / "eval", *SMALL],
        ("notes.txt/eval", "cannot write there", "pass --out DIR"),
    ),
    Case(
        "eval-out-inside-checkpoint",
        lambda ws: ["eval", ws.run(), "--out", ws.path("runs/full-lr1e-4/checkpoint-1/eval"), *SMALL],
        ("checkpoint-1", "never written", "--out DIR"),
    ),
    Case(
        "eval-out-locked-by-another-run",
        lambda ws: ["eval", _locked(ws), "--out", ws.out, *SMALL],
        ("another eval run", "pid 4242", "--out DIR"),
    ),
    # ---- score: response files
    Case(
        "score-without-a-metric",
        lambda ws: ["score"],
        ("score refusal FILE --text-column COL", "score chrf"),
    ),
    Case(
        "score-missing-file",
        lambda ws: _score(ws, ws.path("nope.csv")),
        ("nope.csv", "file not found"),
    ),
    Case(
        "score-text-column-not-given",
        lambda ws: ["score", "refusal", _responses(ws)],
        ("--text-column", "required"),
    ),
    Case(
        "score-no-such-column",
        lambda ws: ["score", "refusal", _responses(ws), "--text-column", "answer"],
        ("r.jsonl", "no column 'answer'", "--text-column", "columns are: response, prompt, g"),
    ),
    Case(
        "score-bom-csv-lists-plain-column-names",
        lambda ws: [
            "score",
            "refusal",
            _responses(ws, "excel.csv", "response,prompt\nI'm sorry.,hi\n".encode("utf-8-sig")),
            "--text-column",
            "answer",
        ],
        ("excel.csv", "no column 'answer'", "columns are: response, prompt"),
    ),
    Case(
        "score-prompt-column-missing",
        lambda ws: _score(ws, _responses(ws), "--prompt-column", "question"),
        ("no column 'question'", "--prompt-column"),
    ),
    Case(
        "score-group-by-missing",
        lambda ws: _score(ws, _responses(ws), "--group-by", "checkpoint"),
        ("no column 'checkpoint'", "--group-by"),
    ),
    Case(
        "score-jsonl-bad-line-number",
        lambda ws: _score(
            ws, _responses(ws, text='{"response": "a\u2028b"}\n\n{"response": "ok"}\n{oops}\n')
        ),
        ("r.jsonl", "line 4 is not valid JSON"),
    ),
    Case(
        "score-jsonl-line-not-an-object",
        lambda ws: _score(ws, _responses(ws, text='{"response": "a"}\n[1, 2]\n')),
        ("line 2 is not a JSON object",),
    ),
    Case(
        "score-empty-file",
        lambda ws: _score(ws, _responses(ws, "empty.csv", "response\n")),
        ("empty.csv", "holds no rows"),
    ),
    Case(
        "score-unsupported-type",
        lambda ws: _score(ws, _responses(ws, "r.xlsx", b"PK\x03\x04")),
        ("r.xlsx", "unsupported file type '.xlsx'", ".csv or .jsonl"),
    ),
    Case(
        "score-not-utf8",
        lambda ws: _score(ws, _responses(ws, "latin1.csv", "response\nok\nna\xefve\n".encode("latin-1"))),
        ("latin1.csv", "line 3 is not UTF-8", "save the file as UTF-8"),
    ),
    Case(
        "score-judge-unknown",
        lambda ws: _score(ws, _responses(ws), "--judge", "gpt4"),
        ("--judge", "invalid choice"),
    ),
    Case(
        "score-chrf-ref-column-missing",
        lambda ws: ["score", "chrf", _responses(ws), "--hyp-column", "response", "--ref-column", "reference"],
        ("no column 'reference'", "--ref-column", "columns are: response"),
    ),
]
