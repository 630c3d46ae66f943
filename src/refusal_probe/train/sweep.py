"""Sweeps: a grid (methods x learning rates x any other setting) over a base TrainConfig, from one TOML file.

File layout::

    [sweep]                      # optional
    out = "runs/paper"           # where the runs go (default runs/<file stem>)
    [base]                       # any TrainConfig setting
    model = "meta-llama/Llama-3.2-1B-Instruct"
    [grid]                       # lists; one run per combination
    method = ["full", "lora", "qlora", "dpo"]
    learning_rate = [1e-4, 5e-5, 1e-5, 5e-6]
    [per_method.dpo]             # optional settings for one method only
    per_device_batch_size = 4

Each run is exactly ``refusal-probe train --config FILE --out OUT --run-name NAME --<grid flags>``, so a printed
command (for a cluster) and an in-process run train the same thing. Complete runs are skipped, partial ones resumed.
"""

from __future__ import annotations

import itertools
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.core.settings import read_toml, to_flags
from refusal_probe.train.config import TrainConfig, build_config, coerce, default_run_name, field_names

SWEEP_KEYS = ("name", "out", "description")
FIRST = ("method", "learning_rate")  # outer loops, in this order


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    out: Path
    grid: dict[str, list[Any]]


@dataclass(frozen=True)
class PlannedRun:
    name: str
    overrides: dict[str, Any]  # this run's grid values
    config: TrainConfig


def load_sweep(path: str | Path, out: str | Path | None = None) -> Sweep:
    path = Path(path)
    doc = read_toml(path)
    meta = doc.get("sweep", {})
    unknown = [k for k in meta if k not in SWEEP_KEYS]
    if unknown:
        raise UserError(f"{path}: [sweep] has unknown key '{unknown[0]}'; allowed: {', '.join(SWEEP_KEYS)}")
    grid = doc.get("grid", {})
    if not isinstance(grid, dict):
        raise UserError(f"{path}: [grid] must be a table of setting = [values]")
    known = field_names()
    for key, values in grid.items():
        if key not in known:
            raise UserError(
                f"{path}: [grid] names unknown setting '{key}'; use TrainConfig names, e.g. method, "
                "learning_rate"
            )
        if key == "run_name":
            raise UserError(f"{path}: run_name cannot be swept; run names are made from the grid values")
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: [grid] {key} must be a non-empty list, e.g. {key} = [...]")
    if doc.get("base", {}).get("run_name") or doc.get("run_name"):
        raise UserError(f"{path}: a sweep names its runs itself; remove run_name")
    ordered = {k: grid[k] for k in FIRST if k in grid} | {k: v for k, v in grid.items() if k not in FIRST}
    name = str(meta.get("name") or path.stem)
    return Sweep(path=path, name=name, out=Path(out or meta.get("out") or Path("runs") / name), grid=ordered)


def run_label(values: dict[str, Any], base: TrainConfig) -> str:
    """'<method>-lr<lr>' plus '-<setting><value>' for every other swept setting."""
    label = default_run_name(
        values.get("method", base.method), values.get("learning_rate", base.learning_rate)
    )
    for key, value in values.items():
        if key in FIRST:
            continue
        text = "+".join(map(str, value)) if isinstance(value, list) else str(value)
        label += f"-{key.replace('_', '')}{text}"
    return label.replace("/", "_")


def expand(sweep: Sweep) -> list[PlannedRun]:
    """Every grid combination as a validated config (a typo fails here, before hours of training)."""
    keys = list(sweep.grid)
    base = build_config(sweep.path, {})
    runs, seen = [], set()
    for combo in itertools.product(*(sweep.grid[k] for k in keys)):
        # coerced first: a run's name is made from its values (learning_rate = ["fast"] is named, not a crash)
        values = {k: coerce(k, v, f"{sweep.path} [grid]") for k, v in zip(keys, combo, strict=True)}
        name = run_label(values, base)
        if name in seen:
            raise UserError(
                f"{sweep.path}: two grid points share the run name '{name}'; remove duplicate values"
            )
        seen.add(name)
        config = build_config(sweep.path, {**values, "run_name": name})
        runs.append(PlannedRun(name=name, overrides=values, config=config))
    return runs


def train_command(sweep: Sweep, run: PlannedRun, accelerate: bool = False) -> list[str]:
    head = ["accelerate", "launch", "-m", "refusal_probe.cli"] if accelerate else ["refusal-probe"]
    return [
        *head,
        "train",
        "--config",
        str(sweep.path),
        "--out",
        str(sweep.out),
        "--run-name",
        run.name,
        *to_flags(run.overrides),
    ]


def status_line(sweep: Sweep, run: PlannedRun) -> str:
    from refusal_probe.train.lifecycle import RESUME, run_status

    status, last = run_status(sweep.out / run.name)
    return f"resume from {last.name}" if status == RESUME and last else status


def preflight(sweep: Sweep, runs: list[PlannedRun]) -> None:
    """Every run's refusals (a folder inside another run's, changed settings of a complete or partial run) before the
    first one trains: a sweep does not stop hours in on a run it could have refused at the start."""
    from refusal_probe.train.runner import prepare

    for run in runs:
        prepare(run.config, sweep.out)


def run_sweep(sweep: Sweep, runs: list[PlannedRun], accelerate: bool = False) -> list[Path]:
    """Train each run in turn (in this process, or through `accelerate launch` for several GPUs)."""
    from refusal_probe.core.io import prepare_output
    from refusal_probe.train.runner import train

    preflight(sweep, runs)
    prepare_output(sweep.out, marker=False)
    done = []
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.name}: {status_line(sweep, run)}", flush=True)
        if accelerate:
            cmd = train_command(sweep, run, accelerate=True)
            code = subprocess.call(cmd)
            if code != 0:
                raise UserError(
                    f"run {run.name} failed (exit {code}): {shlex.join(cmd)}; fix it and re-run the "
                    "sweep to resume"
                )
            done.append(sweep.out / run.name)
        else:
            done.append(train(run.config, sweep.out))
        sys.stdout.flush()
    return done
