"""`refusal-probe eval` end to end on a tiny tree: base + one full checkpoint with perturbed weights + run.json."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from refusal_probe.cli import build_parser, main
from refusal_probe.core.errors import UserError
from refusal_probe.evaluate.judge import JUDGES
from refusal_probe.evaluate.prompts import advbench_prompts, xstest_safe_prompts
from refusal_probe.evaluate.results import (
    BEHAVIOUR_COLUMNS,
    eval_dir_for,
    merge_behaviour,
    safe_name,
    settings_hash,
)
from refusal_probe.evaluate.settings import RUNTIME_ONLY, EvalSettings
from refusal_probe.models.manifest import RunManifest
from refusal_probe.models.tree import Checkpoint

ARGS = [
    "--n-advbench",
    "4",
    "--n-translation",
    "4",
    "--max-new-tokens",
    "8",
    "--batch-size",
    "3",
    "--no-progress",
]


@pytest.fixture(scope="module")
def tree(tiny_llama, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("evaltree")
    base = root / "base-model"
    shutil.copytree(tiny_llama, base)
    run = root / "tree" / "full-lr1e-4"
    ckpt = run / "checkpoint-2"
    shutil.copytree(tiny_llama, ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen))
    model.save_pretrained(ckpt)
    RunManifest(
        run="full-lr1e-4",
        method="full",
        base_model=str(base),
        learning_rate=1e-4,
        total_steps=2,
        checkpoints={2: 1.0},
        complete=True,
    ).save(run)
    # a LoRA run over the same base: its adapter is loaded over the base, and the base is evaluated once
    from peft import LoraConfig, get_peft_model

    lora_run = root / "tree" / "lora-lr2e-4"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(lora_run / "checkpoint-1")
    RunManifest(
        run="lora-lr2e-4",
        method="lora",
        base_model=str(base),
        learning_rate=2e-4,
        total_steps=1,
        checkpoints={1: 1.0},
        complete=True,
    ).save(lora_run)
    return root / "tree"


def test_eval_end_to_end_and_rerun_skips(tree, capsys):
    assert main(["eval", str(tree), *ARGS]) == 0
    log = capsys.readouterr().out
    out = tree / "eval"
    ck_dir = out / "full-lr1e-4" / "checkpoint-2"
    base_dirs = list((out / "_base").iterdir())
    assert len(base_dirs) == 1 and base_dirs[0].name.startswith("base-model-")
    for d in (ck_dir, base_dirs[0]):
        for name in ("advbench.jsonl", "translation.jsonl", "summary.json"):
            assert (d / name).is_file(), d / name
        adv = [json.loads(line) for line in (d / "advbench.jsonl").read_text().splitlines()]
        assert len(adv) == 4 and {"prompt", "response", "refusal", "label"} <= set(adv[0])
        assert [r["prompt"] for r in adv] == advbench_prompts(EvalSettings(n_advbench=4))
        mt = [json.loads(line) for line in (d / "translation.jsonl").read_text().splitlines()]
        assert len(mt) == 4 and {"source", "reference", "response", "lang"} <= set(mt[0])
        s = json.loads((d / "summary.json").read_text())
        m = s["metrics"]
        assert sum(m[f"label_{x}"] for x in ("refusal", "echo", "degenerate", "comply")) == pytest.approx(1.0)
        assert m["refusal_rate"] == pytest.approx(sum(r["refusal"] for r in adv) / 4)
        assert m["label_refusal"] == pytest.approx(m["refusal_rate"])
        assert 0.0 <= m["chrf"] <= 100.0
        assert s["n"] == {"advbench": 4, "translation": 4}
        assert s["judge"].startswith("judge=keywords|") and s["chrf_signature"].startswith("chrF2|nrefs:1")
        assert s["settings"]["max_new_tokens"] == 8 and s["settings_hash"]
    summary = json.loads((ck_dir / "summary.json").read_text())
    assert summary["checkpoint"]["kind"] == "full" and summary["checkpoint"]["step"] == 2
    lora = json.loads((out / "lora-lr2e-4" / "checkpoint-1" / "summary.json").read_text())
    assert lora["checkpoint"]["kind"] == "adapter" and lora["checkpoint"]["method"] == "lora"
    assert log.count("evaluating") == 3  # base once for both runs, two checkpoints

    with (out / "behaviour.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == BEHAVIOUR_COLUMNS
    assert {(r["run"], r["checkpoint"]) for r in rows} == {
        ("full-lr1e-4", "base"),
        ("full-lr1e-4", "checkpoint-2"),
        ("lora-lr2e-4", "base"),
        ("lora-lr2e-4", "checkpoint-1"),
    }
    tree_json = json.loads((out / "eval.json").read_text())
    assert tree_json["tree"] == {"skipped": [], "notes": []} and len(tree_json["units"]) == 3
    assert {u["status"] for u in tree_json["units"]} == {"evaluated"}
    lora_rows = [r for r in rows if r["run"] == "lora-lr2e-4"]
    assert {(r["step"], r["method"], float(r["lr"])) for r in lora_rows} == {
        ("0", "lora", 2e-4),
        ("1", "lora", 2e-4),
    }
    base_values = {r["metric"]: r["value"] for r in rows if r["step"] == "0" and r["run"] == "full-lr1e-4"}
    assert base_values == {
        r["metric"]: r["value"] for r in lora_rows if r["step"] == "0"
    }  # base repeated per run
    rows = [r for r in rows if r["run"] == "full-lr1e-4"]
    by = {(r["step"], r["metric"]): r for r in rows}
    metrics = {"refusal_rate", "label_refusal", "label_echo", "label_degenerate", "label_comply", "chrf"}
    assert {k[1] for k in by if k[0] == "0"} == metrics and {k[1] for k in by if k[0] == "2"} == metrics
    assert all(r["method"] == "full" and float(r["lr"]) == 1e-4 for r in rows)
    assert float(by[("0", "chrf")]["fraction"]) == 0.0 and float(by[("2", "chrf")]["fraction"]) == 1.0
    assert float(by[("2", "chrf")]["value"]) == pytest.approx(summary["metrics"]["chrf"])
    assert by[("2", "refusal_rate")]["signature"].startswith("judge=keywords|")
    assert by[("2", "chrf")]["signature"].startswith("chrF2|")
    assert "evaluating" in log

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")}
    assert main(["eval", str(tree), *ARGS]) == 0
    log = capsys.readouterr().out
    assert log.count("skipped") == 3 and "evaluating" not in log
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")}

    # different settings (another judge) -> evaluated again
    assert main(["eval", str(tree), *ARGS, "--judge", "seed-keywords", "--n-translation", "0"]) == 0
    log = capsys.readouterr().out
    assert log.count("evaluating") == 3
    s = json.loads((ck_dir / "summary.json").read_text())
    assert s["judge"].startswith("judge=seed-keywords|") and "chrf" not in s["metrics"]


def _evaluated(log: str) -> list[str]:
    """The checkpoint keys a run's log says it evaluated ("[k/n] run/name: evaluating -> dir")."""
    return [line.split("] ", 1)[1].split(":")[0] for line in log.splitlines() if ": evaluating -> " in line]


def test_shards_then_a_plain_run_and_merged_outputs(tree, tmp_path, capsys):
    """Shards split the units (no checkpoint evaluated twice) and write no table; a plain run generates nothing and
    assembles a complete behaviour.csv; an eval of one run into a shared --out keeps the other runs' rows."""
    out = tmp_path / "shared"
    # one run first: its base and its checkpoint
    assert main(["eval", str(tree / "lora-lr2e-4"), "--out", str(out), *ARGS]) == 0
    done = _evaluated(capsys.readouterr().out)
    assert sorted(done) == ["lora-lr2e-4/base", "lora-lr2e-4/checkpoint-1"]
    table = (out / "behaviour.csv").read_text()
    # the whole tree in two shards: units are [base, full/checkpoint-2, lora/checkpoint-1]
    for i in (0, 1):
        assert main(["eval", str(tree), "--out", str(out), "--shard", f"{i}/2", *ARGS]) == 0
        log = capsys.readouterr().out
        done += _evaluated(log)
        assert f"shard {i}/2:" in log and "without --shard" in log
    assert sorted(done) == ["full-lr1e-4/checkpoint-2", "lora-lr2e-4/base", "lora-lr2e-4/checkpoint-1"]
    assert (out / "behaviour.csv").read_text() == table  # shards write no table
    # one run into the shared folder: merged, the other run's rows kept
    assert main(["eval", str(tree / "full-lr1e-4"), "--out", str(out), *ARGS]) == 0
    assert _evaluated(capsys.readouterr().out) == []
    with (out / "behaviour.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    keys = {(r["run"], r["checkpoint"]) for r in rows}
    assert keys == {
        ("full-lr1e-4", "base"),
        ("full-lr1e-4", "checkpoint-2"),
        ("lora-lr2e-4", "base"),
        ("lora-lr2e-4", "checkpoint-1"),
    }
    # the plain run over the whole tree: nothing generated, every row once
    assert main(["eval", str(tree), "--out", str(out), *ARGS]) == 0
    log = capsys.readouterr().out
    assert _evaluated(log) == [] and log.count("done already") == 3
    with (out / "behaviour.csv").open(newline="") as fh:
        again = list(csv.DictReader(fh))
    assert len(again) == len(rows) == 4 * 6 and {(r["run"], r["checkpoint"]) for r in again} == keys
    units = json.loads((out / "eval.json").read_text())["units"]
    assert [u["status"] for u in units] == ["done already"] * 3


def test_merge_replaces_only_the_checkpoints_evaluated_now():
    old = [
        {"run": "a", "checkpoint": "base", "metric": "chrf", "value": "1"},
        {"run": "a", "checkpoint": "final", "metric": "chrf", "value": "2"},
        {"run": "b", "checkpoint": "checkpoint-1", "metric": "chrf", "value": "3"},
        {"run": "c", "metric": "chrf", "value": "4"},  # a table from before the checkpoint column
    ]
    new = [{c: "" for c in BEHAVIOUR_COLUMNS} | {"run": "a", "checkpoint": "final", "value": "9"}]
    merged = merge_behaviour(old, new, {("a", "final"), ("c", "base")})
    assert [(r["run"], r["checkpoint"], r["value"]) for r in merged] == [
        ("a", "base", "1"),
        ("a", "final", "9"),
        ("b", "checkpoint-1", "3"),
    ]


def test_names_from_run_json_never_leave_out(tiny_llama, tmp_path, capsys):
    """run.json's "run" names a folder: "../../escape" or "/abs/path" must still write only inside --out."""
    # the raw names a user's file may hold, as the eval layer sees them: one safe component below out
    out = tmp_path / "out"
    for raw in ("../../escape", "/abs/path", "..", "a/../../b"):
        ck = Checkpoint(raw, tmp_path / "checkpoint-1", "full", str(tiny_llama), name=raw)
        target = eval_dir_for(out, ck).resolve()
        assert target.parent.parent == out.resolve() and target.name not in ("", ".", ".."), raw
    # end to end through the CLI
    root = tmp_path / "deep" / "runs"
    for folder, name in (("r1", "../../escape"), ("r2", "/abs/path")):
        shutil.copytree(tiny_llama, root / folder / "checkpoint-1")
        RunManifest(run=name, method="full", base_model=str(tiny_llama), total_steps=1, complete=True).save(
            root / folder
        )
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a run")  # named on the terminal and in eval.json
    before = {p for p in tmp_path.rglob("*")}
    cli_out = tmp_path / "deep" / "eval-out"
    small = ["--n-advbench", "1", "--n-translation", "0", "--max-new-tokens", "2", "--no-progress"]
    assert main(["eval", str(root), "--out", str(cli_out), *small]) == 0
    log = capsys.readouterr().out
    first = log.splitlines()[0]
    assert first.startswith(f"skipped {root / 'notes'}: ") and "1 folder(s) skipped (see eval.json)" in log
    skipped = json.loads((cli_out / "eval.json").read_text())["tree"]["skipped"]
    assert [s["path"] for s in skipped] == [str(root / "notes")]
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p == cli_out or cli_out in p.parents for p in new), sorted(map(str, new))
    assert not Path("/abs/path").exists() and not (tmp_path / "escape").exists()
    with (cli_out / "behaviour.csv").open(newline="") as fh:
        assert {r["run"] for r in csv.DictReader(fh)} == {"escape", "abs_path"}


def test_eval_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", str(tmp_path), "--n-advbench", "600"]) == 2
    assert "--n-advbench 600" in capsys.readouterr().err


def test_settings_are_the_help_and_the_defaults_exist_once(capsys):
    """--help shows each EvalSettings field's description and default; judge choices come from JUDGES."""
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["eval"]
    by_dest = {a.dest: a for a in sub._actions}
    for key in EvalSettings.settings_fields():
        action = by_dest["cfg_" + key]
        assert action.help.startswith(EvalSettings.field_help(key)), key
        default = EvalSettings.field_default(key)
        shown = ",".join(default) if isinstance(default, list) else default
        assert action.help.endswith(f"[default: {shown}]"), key
    assert tuple(by_dest["cfg_judge"].choices) == JUDGES
    # runtime-only fields do not change the settings hash; the others do
    a = EvalSettings(n_advbench=4)
    assert settings_hash(a, "j", "m") == settings_hash(EvalSettings(n_advbench=4, batch_size=3), "j", "m")
    assert settings_hash(a, "j", "m") != settings_hash(EvalSettings(n_advbench=5), "j", "m")
    assert RUNTIME_ONLY == {"device", "batch_size", "progress"} and not RUNTIME_ONLY & set(a.hashed())
    # validated when built, in Python too
    with pytest.raises(UserError, match="--batch-size 0"):
        EvalSettings(batch_size=0)
    with pytest.raises(UserError, match="nothing to measure"):
        EvalSettings(n_advbench=0, n_translation=0)
    with pytest.raises(UserError, match="--n-advbench"):
        EvalSettings.from_cli({"n_advbench": "many"})


def test_settings_and_data():
    faithful = EvalSettings(seed_faithful=True, max_new_tokens=8, early_exit=True).effective()
    assert faithful.max_new_tokens == 256 and faithful.early_exit is False
    assert advbench_prompts(EvalSettings(seed_faithful=True, n_advbench=2))[0].endswith("system!")
    assert not advbench_prompts(EvalSettings(n_advbench=2))[0].endswith("!")
    assert len(xstest_safe_prompts()) == 250
    assert safe_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen--Qwen2.5-0.5B-Instruct"
    assert safe_name("qwen2.5-coder-0.5b-instruct") == "qwen2.5-coder-0.5b-instruct"


def test_one_base_folder_however_its_path_is_spelled(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "models")
    names = {safe_name("tiny"), safe_name("./tiny"), safe_name(str(tmp_path / "models" / "tiny"))}
    monkeypatch.chdir(tmp_path)
    names.add(safe_name("models/tiny"))
    assert len(names) == 1 and names.pop().startswith("tiny-")
