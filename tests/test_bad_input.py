"""Bad input and faults, one parametrised matrix driven through the CLI.

Each case must end with exit code 2, one error line on stderr that names the file or flag (and the fix), no
traceback, and an input workspace whose every file hashes the same afterwards. Case lists: tests/bad_input_*.py.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from badinput import Case, Workspace

from refusal_probe.cli import main

HERE = Path(__file__).parent


def _cases() -> list[Case]:
    cases: list[Case] = []
    for module in sorted(HERE.glob("bad_input_*.py")):
        cases += importlib.import_module(module.stem).CASES
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "bad-input case ids must be unique"
    return cases


CASES = _cases()


def test_matrix_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, tiny_llama, capsys, monkeypatch):
    monkeypatch.delenv("REFUSAL_PROBE_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    for key, value in case.env:
        monkeypatch.setenv(key, value)
    ws = Workspace(tmp_path / "ws", tiny_llama)
    ws.root.mkdir()
    argv = [str(a) for a in case.argv(ws)]
    before = ws.digest()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err and "Traceback" not in captured.out
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, f"no error message (rc {rc}, stdout: {captured.out[-300:]!r})"
    message = lines[-1]
    assert rc == case.rc, f"exit {rc}: {message}"
    assert message.startswith(f"refusal-probe {argv[0]}") and ": error: " in message, message
    assert [line for line in lines if ": error: " in line or "internal error" in line] == [message]
    for fragment in case.expect:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert ws.digest() == before, "the input workspace changed"
    # finished work may stay cached under out/cache (a fixed re-run resumes); no result table is written
    assert not [p for p in ws.out.glob("*") if p.suffix in (".csv", ".parquet", ".html", ".md")], (
        "results written"
    )
