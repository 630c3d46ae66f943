"""The study's claims as comparisons with intervals (analysis/claims.py): verdicts and shares by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from refusal_probe.analysis.claims import compare, early_share, rate_gap, tally, verdict


def test_verdict_sides():
    assert verdict(0.1, 0.3) == "agrees" and verdict(-0.3, -0.1) == "disagrees"
    assert verdict(-0.1, 0.1) == "inconclusive" and verdict(math.nan, 1.0) == "inconclusive"
    assert verdict(0.55, 0.9, 0.5) == "agrees" and verdict(0.2, 0.45, 0.5) == "disagrees"


def test_rate_gap_is_newcombes_interval():
    # equal rates: a symmetric interval around 0; 90/100 vs 10/100: Wilson half-widths of ~0.06-0.08 each
    d, lo, hi = rate_gap(0.5, 0.5, 40)
    assert d == 0 and lo < 0 < hi and lo == pytest.approx(-hi)
    d, lo, hi = rate_gap(0.9, 0.1, 100)
    assert d == pytest.approx(0.8) and 0.6 < lo < 0.8 < hi < 0.9


def test_early_share_by_hand():
    assert early_share(0.8, 0.4, 0.0, 10**6)[0] == pytest.approx(0.5)
    share, lo, hi = early_share(0.8, 0.2, 0.0, 10**6)
    assert (
        share == pytest.approx(0.75)
        and lo == pytest.approx(0.75, abs=0.01)
        and hi == pytest.approx(0.75, abs=0.01)
    )
    assert all(math.isnan(x) for x in early_share(0.5, 0.5, 0.6, 100))  # no loss: no share
    _, lo, hi = early_share(0.8, 0.4, 0.0, 32)  # 32 prompts: wide
    assert lo < 0.5 < hi and hi - lo > 0.2


def _table(rows):
    cols = ["run", "checkpoint", "method", "lr", "step", "fraction", "refusal_rate"]
    return pd.DataFrame(rows, columns=cols)


def test_compare_on_a_small_sweep():
    rows = []
    for run, method, lr, path in (
        ("full-hi", "full", 1e-4, (0.0, 0.0, 0.0, 0.0)),  # lost everything in the first quarter
        ("full-lo", "full", 1e-5, (0.6, 0.4, 0.2, 0.1)),  # lost slowly
        ("lora-hi", "lora", 1e-4, (0.8, 0.8, 0.8, 0.8)),  # kept
        ("lora-lo", "lora", 1e-5, (0.8, 0.8, 0.8, 0.8)),
    ):
        rows.append((run, "base", method, lr, 0, 0.0, 0.8))
        rows += [
            (run, f"checkpoint-{s}", method, lr, s, s / 8, r) for s, r in zip((2, 4, 6, 8), path, strict=True)
        ]
    got = {c.what: c for c in compare(_table(rows), 200)}
    assert got["lr 0.0001: lora - full final refusal"].estimate == pytest.approx(0.8)
    assert got["lr 0.0001: lora - full final refusal"].verdict == "agrees"
    assert got["lr 1e-05: lora - full final refusal"].verdict == "agrees"
    assert got["full: lr 1e-05 - lr 0.0001 final refusal"].estimate == pytest.approx(0.1)
    assert got["full: lr 1e-05 - lr 0.0001 final refusal"].verdict == "agrees"  # 20/200 vs 0/200
    assert got["lora: lr 1e-05 - lr 0.0001 final refusal"].verdict == "inconclusive"
    fast = got["full-hi: share of the loss by step 2 (fraction 0.25)"]
    slow = got["full-lo: share of the loss by step 2 (fraction 0.25)"]
    assert fast.estimate == pytest.approx(1.0) and fast.verdict == "agrees"
    assert slow.estimate == pytest.approx(0.2 / 0.7) and slow.verdict == "disagrees"
    assert not any(c.startswith("lora-") for c in got)  # runs that lost nothing have no share
    assert tally(list(got.values()))["method"] == {"agrees": 2}
    # a run whose base was not evaluated has no share (and no crash)
    no_base = _table([r for r in rows if not (r[0] == "full-lo" and r[4] == 0)])
    assert not any(c.what.startswith("full-lo:") for c in compare(no_base, 200))
