"""`refusal-probe demo` end to end on a tiny random model: every stage runs, and the closing lines are the tables'."""

from __future__ import annotations

import pandas as pd
import pytest

from refusal_probe.cli import main
from refusal_probe.demo import DemoSettings

SMALL = "--steps 2 --n-advbench 4 --n-translation 4 --max-new-tokens 8 --n-prompts 12".split()


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("demo") / "demo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFUSAL_PROBE_CACHE", str(tmp_path_factory.mktemp("demo-cache")))
        return out, main(["demo", "--model", str(tiny_llama), "--out", str(out), *SMALL])


def test_demo_trains_both_methods_with_the_chosen_checkpoints(demo):
    out, rc = demo
    assert rc == 0
    runs = sorted(p.name for p in (out / "runs").iterdir() if (p / "run.json").is_file())
    assert runs == ["full-lr2e-05", "lora-lr0.0002"]
    for run in runs:  # 2 steps at fractions 0.5, 1.0 -> checkpoints 1 and 2
        assert sorted(p.name for p in (out / "runs" / run).glob("checkpoint-*")) == [
            "checkpoint-1",
            "checkpoint-2",
        ]
    assert (out / "runs" / "analysis" / "report.html").is_file()


def test_demo_closes_with_the_tables_headline_numbers(demo):
    from refusal_probe.demo import headline

    out, _ = demo
    analysis = out / "runs" / "analysis"
    lines = headline(analysis)
    table = pd.read_csv(analysis / "checkpoints.csv")
    final = table[table["step"] == 2]
    assert len(lines) == 2 == len(final)
    for _, r in final.iterrows():
        (line,) = [x for x in lines if x.strip().startswith(r["run"])]
        assert f"cosine to the base refusal direction {r['cos_to_base_at_rl']:.2f}" in line
        assert f"-> {r['refusal_rate']:.0%}" in line and f"-> {r['chrf']:.1f}" in line


def test_demo_settings_defaults_are_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert DemoSettings.field_help("n_prompts") in " ".join(text.split())
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err
