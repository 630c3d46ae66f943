"""Bad-input cases of the gradient/loss safety options of `train` (--gradient-surgery, --ewc,
--refusal-preservation, --token-weighting): ranges, combinations that make no sense, and faulty --safety-pairs and
--token-weights files. All but the two that need the tokenised data are refused before any model is loaded."""

from __future__ import annotations

from bad_input_train import _train
from badinput import Case, Workspace


def _pairs(ws: Workspace, text: str, *extra: str) -> list:
    return _train(ws, "--gradient-surgery", "--safety-pairs", ws.file("pairs.jsonl", text), *extra)


def _weights(ws: Workspace, text: str, *extra: str) -> list:
    return _train(
        ws, "--method", "full", "--token-weighting", "--token-weights", ws.file("w.jsonl", text), *extra
    )


CASES = [
    Case(
        "train-gradients-token-weighting-dpo",
        lambda ws: _train(ws, "--method", "dpo", "--token-weighting"),
        ("--token-weighting", "DPO", "--method full/lora/qlora"),
    ),
    Case(
        "train-gradients-token-weights-without-weighting",
        lambda ws: _train(ws, "--token-weights", ws.file("w.jsonl", '{"index": 0, "weights": [1]}\n')),
        ("--token-weights FILE needs --token-weighting",),
    ),
    Case(
        "train-gradients-token-weighting-whole-chat",
        lambda ws: _train(ws, "--token-weighting", "--no-completion-only-loss"),
        ("--token-weighting", "--completion-only-loss"),
    ),
    Case("train-gradients-ewc-negative", lambda ws: _train(ws, "--ewc", "-1"), ("ewc=-1.0", "--ewc", ">= 0")),
    Case(
        "train-gradients-preservation-nan",
        lambda ws: _train(ws, "--refusal-preservation", "nan"),
        ("refusal_preservation=nan", "--refusal-preservation", "finite"),
    ),
    Case(
        "train-gradients-surgery-every-zero",
        lambda ws: _train(ws, "--gradient-surgery", "--surgery-every", "0"),
        ("surgery_every=0", "--surgery-every"),
    ),
    Case(
        "train-gradients-surgery-mode",
        lambda ws: _train(ws, "--gradient-surgery", "--surgery-mode", "layer"),
        ("--surgery-mode", "layer"),
    ),
    Case(
        "train-gradients-alpha-range",
        lambda ws: _train(ws, "--token-weighting", "--token-weight-alpha", "2"),
        ("token_weight_alpha=2.0", "--token-weight-alpha", "[0, 1]"),
    ),
    Case(
        "train-gradients-safety-prompts-range",
        lambda ws: _train(ws, "--gradient-surgery", "--safety-prompts", "0"),
        ("safety_prompts=0", "--safety-prompts", "1..143"),
    ),
    Case(
        "train-gradients-safety-pairs-unused",
        lambda ws: _train(ws, "--safety-pairs", ws.file("pairs.jsonl", '{"prompt": "a", "response": "b"}\n')),
        ("--safety-pairs", "--gradient-surgery or --ewc"),
    ),
    Case(
        "train-gradients-safety-pairs-missing",
        lambda ws: _train(ws, "--ewc", "1", "--safety-pairs", ws.path("nowhere.jsonl")),
        ("--safety-pairs", "nowhere.jsonl", "no such file"),
    ),
    Case(
        "train-gradients-safety-pairs-bad-line",
        lambda ws: _pairs(ws, '{"prompt": "a", "response": "b"}\n{"prompt": \n'),
        ("--safety-pairs", "pairs.jsonl", "line 2 is not valid JSON"),
    ),
    Case(
        "train-gradients-safety-pairs-missing-field",
        lambda ws: _pairs(ws, '{"prompt": "a"}\n'),
        ("--safety-pairs", "line 1", '"response"'),
    ),
    Case(
        "train-gradients-safety-pairs-empty",
        lambda ws: _pairs(ws, "\n\n"),
        ("--safety-pairs", "holds no prompt/response lines"),
    ),
    Case(
        "train-gradients-token-weights-negative",
        lambda ws: _weights(ws, '{"index": 0, "weights": [0.5, -1]}\n'),
        ("--token-weights", "w.jsonl", "line 1", "weight -1", ">= 0"),
    ),
    Case(
        "train-gradients-token-weights-not-json",
        lambda ws: _weights(ws, "index,weights\n"),
        ("--token-weights", "line 1 is not valid JSON"),
    ),
    Case(
        "train-gradients-token-weights-repeated",
        lambda ws: _weights(ws, '{"index": 0, "weights": [1]}\n{"index": 0, "weights": [1]}\n'),
        ("--token-weights", "line 2 repeats example 0"),
    ),
    Case(
        "train-gradients-token-weights-no-such-example",
        lambda ws: _weights(ws, '{"index": 99, "weights": [1]}\n'),
        ("--token-weights", "example 99 does not exist", "2 examples"),
    ),
    Case(
        "train-gradients-token-weights-count",
        lambda ws: _weights(ws, '{"index": 0, "weights": [1, 1]}\n'),
        ("--token-weights", "example 0 has", "answer tokens but 2 weights", "one weight per answer token"),
    ),
    Case(
        "train-gradients-preservation-no-direction",
        lambda ws: _train(ws, "--refusal-preservation", "1"),
        ("no refusal direction", "--refusal-direction"),
    ),
]
