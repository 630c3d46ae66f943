"""Bad-input cases of `analyze` and `directions`: input files, flags, output folders. Each is refused with one line
that names the file or flag, and (apart from the cases that need a loaded model to know) before any model loads."""

from __future__ import annotations

import fcntl
from pathlib import Path

from badinput import Case, Workspace

FAST = ["--n-prompts", "4", "--n-val", "2", "--layer", "1", "--position", "-1", "--no-progress"]
DFAST = ["--n-train", "4", "--n-val", "2", "--layer", "1", "--position", "-1", "--search", "full", "--quiet"]
_HELD: list = []  # lock handles held open for the duration of a case (a "running" analyze)


def _analyze(ws: Workspace, *extra) -> list:
    return ["analyze", ws.run(steps=(1,)), "--out", ws.out, *FAST, *extra]


def _directions(ws: Workspace, *extra) -> list:
    return ["directions", ws.model(), "--out", ws.out, *DFAST, *extra]


def _held_lock(ws: Workspace) -> list:
    """Another analyze holds the output folder's lock while this one starts."""
    ws.out.mkdir(parents=True, exist_ok=True)
    handle = open(ws.out / ".lock", "a+")  # noqa: SIM115 - held until the case ends
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _HELD.append(handle)
    return _analyze(ws)


def _prompts(ws: Workspace, n: int, name: str = "harmful.txt") -> str:
    return str(ws.file(name, "".join(f"How do I do bad thing number {i}?\n" for i in range(n))))


BEHAVIOUR_HEADER = "run,method,lr,step,fraction,metric,value,signature\n"

CASES = [
    # --behaviour FILE, checked before any model loads
    Case(
        "analyze-behaviour-missing",
        lambda ws: _analyze(ws, "--behaviour", ws.path("eval/nope.csv")),
        ("nope.csv", "not found", "refusal-probe eval"),
    ),
    Case(
        "analyze-behaviour-empty",
        lambda ws: _analyze(ws, "--behaviour", ws.file("beh.csv", "")),
        ("beh.csv", "empty"),
    ),
    Case(
        "analyze-behaviour-header-only",
        lambda ws: _analyze(ws, "--behaviour", ws.file("beh.csv", BEHAVIOUR_HEADER)),
        ("beh.csv", "no rows"),
    ),
    Case(
        "analyze-behaviour-wrong-columns",
        lambda ws: _analyze(ws, "--behaviour", ws.file("beh.csv", "a,b\n1,2\n")),
        ("beh.csv", "lacks columns", "metric"),
    ),
    Case(
        "analyze-behaviour-binary",
        lambda ws: _analyze(ws, "--behaviour", ws.file("beh.csv", b"\xff\xfe\x00\x01PK\x03\x04" * 8)),
        ("beh.csv", "cannot read"),
    ),
    Case(
        "analyze-behaviour-a-folder",
        lambda ws: _analyze(ws, "--behaviour", ws.path("runs")),
        ("runs", "not a file"),
    ),
    # prompt files
    Case(
        "analyze-harmful-missing",
        lambda ws: _analyze(ws, "--harmful", ws.path("nope.txt")),
        ("nope.txt", "not found"),
    ),
    Case(
        "analyze-harmful-empty",
        lambda ws: _analyze(ws, "--harmful", ws.file("harmful.txt", "\n \n")),
        ("harmful.txt", "no prompts"),
    ),
    Case(
        "analyze-harmful-too-few",
        lambda ws: _analyze(ws, "--harmful", _prompts(ws, 2)),
        ("harmful.txt", "2 prompts", "at least 4", "--n-prompts"),
    ),
    Case(
        "analyze-harmless-wrong-column",
        lambda ws: _analyze(ws, "--harmless", ws.file("harmless.csv", "foo,bar\nx,y\n")),
        ("harmless.csv", "no prompt column", "prompt"),
    ),
    Case(
        "analyze-harmful-not-text",
        lambda ws: _analyze(ws, "--harmful", ws.file("harmful.txt", b"\xff\xfe\xfa\x00\x81")),
        ("harmful.txt", "cannot parse"),
    ),
    Case(
        "analyze-harmful-bad-suffix",
        lambda ws: _analyze(ws, "--harmful", ws.file("harmful.xlsx", b"PK\x03\x04")),
        ("harmful.xlsx", ".txt, .csv, .json or .jsonl"),
    ),
    Case(
        "analyze-n-val-more-than-bundled",
        lambda ws: _analyze(ws, "--n-val", "500"),
        ("--n-val 500", "harmful_val"),
    ),
    # flags
    Case("analyze-n-val-zero", lambda ws: _analyze(ws, "--n-val", "0"), ("--n-val", "at least 1")),
    Case("analyze-n-prompts-zero", lambda ws: _analyze(ws, "--n-prompts", "0"), ("--n-prompts", "at least")),
    Case("analyze-batch-size-zero", lambda ws: _analyze(ws, "--batch-size", "0"), ("--batch-size",)),
    Case("analyze-shard-negative", lambda ws: _analyze(ws, "--shard", "-1/2"), ("--shard", "-1/2")),
    Case("analyze-shard-past-end", lambda ws: _analyze(ws, "--shard", "2/2"), ("--shard", "0 <= i < n")),
    Case("analyze-device-banana", lambda ws: _analyze(ws, "--device", "banana"), ("--device", "banana")),
    Case("analyze-search-unknown", lambda ws: _analyze(ws, "--search", "deep"), ("--search", "deep")),
    Case("analyze-backend-unknown", lambda ws: _analyze(ws, "--backend", "jax"), ("--backend", "jax")),
    Case("analyze-position-positive", lambda ws: _analyze(ws, "--position", "2"), ("--position", "negative")),
    Case("analyze-n-prompts-not-a-number", lambda ws: _analyze(ws, "--n-prompts", "many"), ("n-prompts",)),
    Case(
        "analyze-layer-out-of-range", lambda ws: _analyze(ws, "--layer", "99"), ("--layer 99", "out of range")
    ),
    Case(
        "analyze-causal-layers-word",
        lambda ws: _analyze(ws, "--causal-layers", "some"),
        ("--causal-layers 'some'", "refusal, all", "4,8,12"),
    ),
    Case(
        "analyze-causal-layers-negative",
        lambda ws: _analyze(ws, "--causal-layers", "-1"),
        ("--causal-layers '-1'", "refusal, all"),
    ),
    Case(
        "analyze-causal-layers-out-of-range",
        lambda ws: _analyze(ws, "--causal-layers", "1,99"),
        ("--causal-layers 1,99", "layer 99 is out of range", "0..3"),
    ),
    # output folders
    Case(
        "analyze-out-under-a-file",
        lambda ws: ["analyze", ws.run(steps=(1,)), "--out", ws.file("notes.txt", "x") / "analysis", *FAST],
        ("notes.txt", "pass --out DIR"),
    ),
    Case(
        "analyze-out-is-a-file",
        lambda ws: ["analyze", ws.run(steps=(1,)), "--out", ws.file("result.txt", "x"), *FAST],
        ("result.txt", "--out"),
    ),
    Case(
        "analyze-out-inside-checkpoint",
        lambda ws: [
            "analyze",
            ws.run(steps=(1,)),
            "--out",
            ws.path("runs/full-lr1e-4/checkpoint-1/analysis"),
            *FAST,
        ],
        ("checkpoint-1", "never written"),
    ),
    Case("analyze-output-locked", _held_lock, ("another analyze run", "--out DIR")),
    # directions
    Case(
        "directions-n-train-zero", lambda ws: _directions(ws, "--n-train", "0"), ("--n-train", "at least 1")
    ),
    Case("directions-n-val-zero", lambda ws: _directions(ws, "--n-val", "0"), ("--n-val", "at least 1")),
    Case("directions-batch-size-zero", lambda ws: _directions(ws, "--batch-size", "0"), ("--batch-size",)),
    Case(
        "directions-device-banana", lambda ws: _directions(ws, "--device", "banana"), ("--device", "banana")
    ),
    Case(
        "directions-max-layer-fraction",
        lambda ws: _directions(ws, "--max-layer-fraction", "1.5"),
        ("--max-layer-fraction", "(0, 1]"),
    ),
    Case(
        "directions-validate-set-unknown",
        lambda ws: _directions(ws, "--validate-set", "mine"),
        ("--validate-set", "mine"),
    ),
    Case(
        "directions-harmful-too-few",
        lambda ws: _directions(ws, "--harmful", _prompts(ws, 3)),
        ("harmful.txt", "3 prompts", "at least 4", "--n-train"),
    ),
    Case(
        "directions-harmless-missing",
        lambda ws: _directions(ws, "--harmless", ws.path("nope.jsonl")),
        ("nope.jsonl", "not found"),
    ),
    Case(
        "directions-harmful-wrong-column",
        lambda ws: _directions(ws, "--harmful", ws.file("h.json", '[{"q": "x"}]')),
        ("h.json", "no prompt column"),
    ),
    Case(
        "directions-refusal-tokens-empty",
        lambda ws: _directions(ws, "--refusal-tokens", " , "),
        ("--refusal-tokens",),
    ),
    Case(
        "directions-missing-model",
        lambda ws: ["directions", "./nope/model", "--out", ws.out, *DFAST],
        ("./nope/model", "no such"),
    ),
    Case(
        "directions-out-is-a-file",
        lambda ws: ["directions", ws.model(), "--out", ws.file("d.txt", "x"), *DFAST],
        ("d.txt", "--out"),
    ),
    Case(
        "directions-out-under-a-file",
        lambda ws: ["directions", ws.model(), "--out", ws.file("d.txt", "x") / "sub", *DFAST],
        ("d.txt", "pass --out DIR"),
    ),
    Case("directions-position-positive", lambda ws: _directions(ws, "--position", "1"), ("--position",)),
    Case(
        "directions-layer-out-of-range",
        lambda ws: _directions(ws, "--layer", "42"),
        ("--layer 42", "out of range"),
    ),
    Case("directions-dtype-unknown", lambda ws: _directions(ws, "--dtype", "int8"), ("--dtype", "int8")),
]

CASES += [
    Case(
        "analyze-too-few-prompts-for-separability",
        lambda ws: [
            "analyze",
            ws.run(),
            "--n-prompts",
            "2",
            "--n-val",
            "2",
            "--layer",
            "1",
            "--position",
            "-1",
        ],
        ("--n-prompts 2", "--no-separability"),
    ),
]

CASES += [  # noise floors (probe/noise.py): 0 turns one off, otherwise enough to mean something
    Case(
        "analyze-n-boot-prompts-too-few",
        lambda ws: _analyze(ws, "--n-boot-prompts", "5"),
        ("--n-boot-prompts 5", "at least 20"),
    ),
    Case(
        "analyze-n-split-halves-negative",
        lambda ws: _analyze(ws, "--n-split-halves", "-1"),
        ("--n-split-halves -1", "pass 0 (off)"),
    ),
    Case(
        "analyze-n-random-directions-one",
        lambda ws: _analyze(ws, "--n-random-directions", "1"),
        ("--n-random-directions 1", "at least 2"),
    ),
    Case(
        "analyze-split-half-one-prompt",
        lambda ws: _analyze(ws, "--n-prompts", "1", "--no-separability"),
        ("--n-prompts 1", "--n-split-halves 0"),
    ),
]

# `refusal-probe report FOLDER`: a folder analyze wrote, or the tree it was made of
SUMMARY = '{"format": "refusal-probe/analysis/1", "figures": []}'
CHECKPOINTS = "run,checkpoint,method,lr,step,fraction\nr,base,full,0.0001,0,0.0\n"


def _analysis(ws: Workspace, summary: str = SUMMARY, checkpoints: str | None = CHECKPOINTS) -> Path:
    folder = ws.path("analysis")
    ws.file("analysis/summary.json", summary)
    if checkpoints is not None:
        ws.file("analysis/checkpoints.csv", checkpoints)
    return folder


CASES += [
    Case("report-missing", lambda ws: ["report", str(ws.path("nope"))], ("nope", "no such folder")),
    Case("report-a-file", lambda ws: ["report", str(ws.file("x.txt", "x"))], ("x.txt", "not a folder")),
    Case(
        "report-tree-never-analysed",
        lambda ws: ["report", str(ws.run(steps=(1,)))],
        ("full-lr1e-4", "no summary.json", "refusal-probe analyze"),
    ),
    Case(
        "report-summary-not-json",
        lambda ws: ["report", str(_analysis(ws, "{"))],
        ("summary.json", "cannot read it as JSON"),
    ),
    Case(
        "report-summary-of-something-else",
        lambda ws: ["report", str(_analysis(ws, '{"format": "refusal-probe/eval/1"}'))],
        ("summary.json", "not the summary.json of `refusal-probe analyze`"),
    ),
    Case(
        "report-no-checkpoints-table",
        lambda ws: ["report", str(_analysis(ws, checkpoints=None))],
        ("checkpoints.csv", "not found", "re-run"),
    ),
    Case(
        "report-checkpoints-wrong-columns",
        lambda ws: ["report", str(_analysis(ws, checkpoints="a,b\n1,2\n"))],
        ("checkpoints.csv", "lacks columns", "run"),
    ),
    Case(
        "report-out-is-a-file",
        lambda ws: ["report", str(_analysis(ws)), "--out", str(ws.file("r.txt", "x"))],
        ("--out", "r.txt", "is a file"),
    ),
]

# per-prompt internals: the eval's advbench.jsonl beside --behaviour, read before any model loads
EVAL_BEHAVIOUR = (
    "run,checkpoint,method,lr,step,fraction,metric,value,signature\n"
    "full-lr1e-4,checkpoint-1,full,0.0001,1,1.0,refusal_rate,0.5,\n"
)


def _bad_eval_record(ws: Workspace) -> list:
    ws.file("eval/full-lr1e-4/checkpoint-1/advbench.jsonl", '{"i": 0, "response": "no prompt"}\n')
    return _analyze(ws, "--behaviour", ws.file("eval/behaviour.csv", EVAL_BEHAVIOUR))


CASES += [
    Case(
        "analyze-eval-advbench-bad-record",
        _bad_eval_record,
        ("advbench.jsonl", "line 1", "--no-prompt-internals"),
    ),
]
