"""`refusal-probe eval` over a checkpoint tree: discover (the same discovery as `analyze`), check the output, then
evaluate each unit of work (a distinct base, or a checkpoint) that is not finished yet, and assemble behaviour.csv.

``--shard i/n`` (cluster array jobs): task i evaluates every n-th unit of the one stable order, and writes no table;
a final plain run finds every unit finished, generates nothing, and assembles behaviour.csv and eval.json. Each unit
is evaluated under its own folder's lock, so shards never evaluate one checkpoint twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.core.hashing import model_fingerprint
from refusal_probe.core.io import output_lock, prepare_output, write_json
from refusal_probe.core.shard import parse_shard, take_shard
from refusal_probe.evaluate.checkpoint import evaluate_checkpoint
from refusal_probe.evaluate.judge import get_judge
from refusal_probe.evaluate.prompts import prompt_sets
from refusal_probe.evaluate.results import (
    EVAL_JSON_FORMAT,
    behaviour_rows,
    eval_dir_for,
    existing_summary,
    format_metrics,
    merge_behaviour,
    read_behaviour_csv,
    settings_hash,
    write_behaviour_csv,
)
from refusal_probe.evaluate.settings import EvalSettings


@dataclass
class Unit:
    """One evaluation: a result folder and the checkpoints it stands for (a base shared by runs is one unit)."""

    eval_dir: Path
    checkpoints: list[Any] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    status: str = "pending"  # evaluated | done already | another shard's (not finished)

    @property
    def ckpt(self):
        return self.checkpoints[0]


def units_of(tree, out: Path) -> list[Unit]:
    """The units of work in tree order, one per result folder; two checkpoints never share a folder by accident."""
    units: dict[Path, Unit] = {}
    for ckpt in tree:
        eval_dir = eval_dir_for(out, ckpt)
        unit = units.setdefault(eval_dir, Unit(eval_dir))
        if unit.checkpoints and ckpt.kind != "base" and unit.ckpt.key != ckpt.key:
            raise UserError(
                f"{unit.ckpt.path} and {ckpt.path}: both would be written to {eval_dir} (their names differ only "
                "in characters unsafe in a folder name); rename one of the run folders"
            )
        unit.checkpoints.append(ckpt)
    return list(units.values())


def run_eval(
    spec: str,
    out: str | Path | None,
    settings: EvalSettings,
    *,
    base: str | None = None,
    shard: str | None = None,
    log: Callable[[str], None] = print,
) -> list[Unit]:
    """Evaluate the base and every checkpoint under ``spec`` (or this shard's share); write results under ``out``."""
    from refusal_probe.models.tree import default_output, discover

    settings = settings.effective()
    shard_ij = parse_shard(shard)
    tree = discover(spec, base)
    for line in tree.messages():
        log(line)
    out_dir = Path(out).expanduser() if out is not None else default_output(spec, "eval")
    tree.check_output(out_dir)
    prompts = prompt_sets(settings)
    judge = get_judge(settings.judge)
    units = units_of(tree, out_dir)
    prepare_output(
        out_dir
    )  # before any model is loaded: an unwritable --out is one line, not an internal error
    started = time.time()
    todo = take_shard(units, shard_ij)

    def work() -> None:
        for k, unit in enumerate(todo, 1):
            head = f"[{k}/{len(todo)}] {unit.ckpt.key}"
            expected = settings_hash(settings, judge.signature, model_fingerprint(Path(unit.ckpt.path)))
            if _finished(unit, expected):
                log(f"{head}: done already ({unit.eval_dir}), skipped")
                continue
            unit.eval_dir.mkdir(parents=True, exist_ok=True)
            with output_lock(unit.eval_dir, "eval"):
                if _finished(unit, expected):  # another shard finished it meanwhile
                    log(f"{head}: done already ({unit.eval_dir}), skipped")
                    continue
                log(f"{head}: evaluating -> {unit.eval_dir}")
                unit.summary = evaluate_checkpoint(unit.ckpt, unit.eval_dir, settings, prompts)
                unit.status = "evaluated"
            log(f"{head}: {format_metrics(unit.summary['metrics'])}")

    if shard_ij is not None:  # shards of one array job run at once: each unit is locked on its own
        work()
        evaluated = sum(u.status == "evaluated" for u in todo)
        log(
            f"shard {shard}: {evaluated} of {len(todo)} unit(s) evaluated, {len(todo) - evaluated} done already; "
            "then run this same command without --shard to assemble behaviour.csv"
        )
        return todo
    with output_lock(out_dir, "eval"):
        work()
        _assemble(spec, tree, units, out_dir, settings, time.time() - started, log)
    if warning := tree.skipped_warning():
        log(warning)
    return units


def _finished(unit: Unit, expected: str) -> bool:
    summary = existing_summary(unit.eval_dir)
    if summary is None or summary.get("settings_hash") != expected:
        return False
    unit.summary, unit.status = summary, "done already"
    return True


def _assemble(spec, tree, units: list[Unit], out: Path, settings, elapsed: float, log) -> None:
    """behaviour.csv (merged with other runs' rows already there) and eval.json, from the finished summaries."""
    pairs = [(ck, u.summary) for u in units for ck in u.checkpoints if u.summary is not None]
    keys = {(ck.run, ck.name) for ck, _ in pairs}
    path = out / "behaviour.csv"
    rows = merge_behaviour(read_behaviour_csv(path), behaviour_rows(pairs), keys)
    write_behaviour_csv(path, rows)
    write_json(
        out / "eval.json",
        {
            "format": EVAL_JSON_FORMAT,
            "spec": str(spec),
            "tree": tree.to_json(),
            "settings": settings.hashed(),
            "generation": settings.runtime(),
            "units": [
                {
                    "eval_dir": str(u.eval_dir.relative_to(out)),
                    "checkpoints": [ck.key for ck in u.checkpoints],
                    "status": u.status,
                }
                for u in units
            ],
            "behaviour": "behaviour.csv",
            "wall_time_s": round(elapsed, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    skipped = f"; {len(tree.skipped)} folder(s) skipped (see eval.json)" if tree.skipped else ""
    log(f"behaviour table: {path} ({len(keys)} checkpoint(s){skipped})")
