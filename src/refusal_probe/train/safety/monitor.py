"""--safety-monitor: every N steps, a cheap safety signal; when it falls, roll back and lower the learning rate.

Signal: the mean projection, on the base refusal direction, of a fixed harmful prompt set's resid_pre at the
direction's layer (last post-instruction token), measured in eval mode without gradients: one forward pass per batch,
no generation. At each check where the signal is at least tolerance x its starting value, the state (trainable
weights, optimizer state, and any other stateful callback such as the EMA shadow) is kept in memory; a check below
it restores the last good state, multiplies the learning rate (the optimizer's groups and the scheduler's base
lrs) by a factor, and training continues. Every event and the monitor's own cost go to run.json.

Optional second signal (--monitor-keyword-prompts N): the keyword refusal rate of greedy answers to N harmful
prompts (keyword_signal.py). With it, a check fails when EITHER signal falls below tolerance x its own starting
value; each event records both values, and the record the keyword signal's own seconds (keyword_s, part of
monitor_s). A signal whose start is not positive cannot be seen to fall and passes every check.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from refusal_probe.train.safety.ema import trainable


def scale_lr(optimizer: Any, scheduler: Any, factor: float) -> None:
    """Multiply every param group's lr (and initial_lr) and the scheduler's base lrs by ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the scheduler
    if inner is not None and hasattr(inner, "base_lrs"):
        inner.base_lrs = [lr * factor for lr in inner.base_lrs]


class SafetyMonitor(TrainerCallback):
    """``signal(model) -> float``; ``extra``: objects with state_dict/load_state_dict rolled back with the model."""

    def __init__(
        self,
        signal: Callable[[Any], float],
        every: int,
        tolerance: float,
        lr_factor: float,
        extra: list[Any] | None = None,
        previous: dict[str, Any] | None = None,
        keyword: Callable[[Any], float] | None = None,
        keyword_info: dict[str, Any] | None = None,
    ):
        self.signal = signal
        self.every = every
        self.tolerance = tolerance
        self.lr_factor = lr_factor
        self.extra = list(extra or [])
        self.start: float | None = None
        self.events: list[dict[str, Any]] = []
        self.monitor_s = 0.0
        self.train_started = 0.0
        self.good: dict[str, Any] | None = None
        self.params: dict[str, torch.nn.Parameter] = {}
        self.previous = (
            previous or {}
        )  # the record of the run this one resumes: its start signal still counts
        self.keyword = keyword  # the optional second signal (None: projection only, the record as before)
        self.keyword_info = dict(keyword_info or {})
        self.start_keyword: float | None = None
        self.keyword_s = 0.0

    def _measure(self, model) -> float:
        t = time.monotonic()
        try:
            return float(self.signal(model))
        finally:
            self.monitor_s += time.monotonic() - t

    def _measure_keyword(self, model) -> float | None:
        if self.keyword is None:
            return None
        t = time.monotonic()
        try:
            return float(self.keyword(model))
        finally:
            spent = time.monotonic() - t
            self.keyword_s += spent
            self.monitor_s += spent

    def _values(self, model) -> tuple[float, float | None]:
        """(projection, keyword refusal or None)."""
        return self._measure(model), self._measure_keyword(model)

    def _event(self, step: int, value: float, keyword: float | None, action: str) -> dict[str, Any]:
        event: dict[str, Any] = {"step": step, "signal": value}
        if self.keyword is not None:
            event["keyword"] = keyword
        event["action"] = action
        return event

    def _below(self, value: float, keyword: float | None) -> list[str]:
        """The signals under tolerance x their start ("projection", "keyword"); a non-positive start never is."""
        below = []
        assert self.start is not None
        if self.start > 0 and value < self.tolerance * self.start:
            below.append("projection")
        start_k = self.start_keyword
        if keyword is not None and start_k is not None and start_k > 0 and keyword < self.tolerance * start_k:
            below.append("keyword")
        return below

    def _keep(self, model, optimizer, step: int) -> None:
        t = time.monotonic()
        self.good = {
            "step": step,
            "params": {n: p.detach().clone() for n, p in self.params.items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
            "extra": [copy.deepcopy(x.state_dict()) for x in self.extra],
        }
        self.monitor_s += time.monotonic() - t

    def _restore(self, model, optimizer) -> None:
        assert self.good is not None
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.good["params"][n])
        if optimizer is not None and self.good["optimizer"] is not None:
            # the moments come back; the learning rates stay the current ones (lowered by earlier rollbacks)
            lrs = [{k: g[k] for k in ("lr", "initial_lr") if k in g} for g in optimizer.param_groups]
            optimizer.load_state_dict(copy.deepcopy(self.good["optimizer"]))
            for group, kept in zip(optimizer.param_groups, lrs, strict=True):
                group.update(kept)
        for x, state in zip(self.extra, self.good["extra"], strict=True):
            x.load_state_dict(copy.deepcopy(state))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.train_started = time.monotonic()
        self.params = trainable(model, optimizer)
        value, keyword = self._values(model)
        step = int(state.global_step)
        if self.previous.get("start_signal") is not None:
            self.start = float(self.previous["start_signal"])
            kept = self.previous.get("start_keyword")
            self.start_keyword = float(kept) if kept is not None else keyword
            self.events = list(self.previous.get("events", []))
            self.monitor_s += float(self.previous.get("monitor_s") or 0.0)
            self.keyword_s += float(self.previous.get("keyword_s") or 0.0)
            self.events.append(self._event(step, value, keyword, "resume"))
            self._keep(model, optimizer, step)
            return
        self.start, self.start_keyword = value, keyword
        if self.start <= 0:
            print(
                f"note: safety monitor: the starting signal {self.start:.4g} is not positive; a fall below "
                f"{self.tolerance} x it cannot be told from a rise, so every check passes"
                + (" it (the keyword signal still counts)" if self.keyword is not None else "")
            )
        if keyword is not None and keyword <= 0:
            print(
                "note: safety monitor: the starting keyword refusal rate is 0; it cannot fall, so every check "
                "passes the keyword signal"
            )
        self.events.append(self._event(step, value, keyword, "start"))
        self._keep(model, optimizer, step)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        step = int(state.global_step)
        if step % self.every:
            return control
        value, keyword = self._values(model)
        assert self.start is not None
        below = self._below(value, keyword)
        if below:
            self._restore(model, optimizer)
            scale_lr(optimizer, lr_scheduler, self.lr_factor)
            lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
            assert self.good is not None
            event = self._event(
                step, value, keyword, f"rollback to step {self.good['step']}, lr x {self.lr_factor}"
            )
            event.update({"restored_step": self.good["step"], "lr": lr})
            if self.keyword is not None:
                event["below"] = below
            self.events.append(event)
            what = f"signal {value:.4g} < {self.tolerance} x {self.start:.4g}"
            if self.keyword is not None:
                assert self.start_keyword is not None
                what = f"{' and '.join(below)} below {self.tolerance} x start (projection {value:.4g} of "
                what += f"{self.start:.4g}, keyword refusal {keyword:.4g} of {self.start_keyword:.4g})"
            print(
                f"safety monitor: step {step}: {what}; "
                f"restored step {self.good['step']}, learning rate x {self.lr_factor}"
            )
        else:
            self.events.append(self._event(step, value, keyword, "ok"))
            self._keep(model, optimizer, step)
        return control

    def record(self) -> dict[str, Any]:
        train_s = max(time.monotonic() - self.train_started, 1e-9) if self.train_started else 0.0
        keyword = (
            {**self.keyword_info, "start_keyword": self.start_keyword, "keyword_s": round(self.keyword_s, 3)}
            if self.keyword is not None
            else {}
        )
        return {
            "every": self.every,
            "tolerance": self.tolerance,
            "lr_factor": self.lr_factor,
            "start_signal": self.start,
            "events": self.events,
            "rollbacks": sum(e["action"].startswith("rollback") for e in self.events),
            "monitor_s": round(self.monitor_s, 3),
            "train_s": round(train_s, 3),
            "monitor_fraction": round(self.monitor_s / train_s, 4) if train_s else None,
            **keyword,
        }
