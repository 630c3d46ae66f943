"""TrainConfig: every training setting, typed, with its help text as the documentation.

One source of truth for three surfaces: the dataclass (Python), TOML files (``refusal-probe train --config``,
``refusal-probe sweep``) and CLI flags (``--learning-rate 1e-4``). Defaults follow Kempermann & Ramackers (2025):
effective batch 8, one epoch, cosine schedule with 10% warmup, weight decay 0.1, LoRA r=8 alpha=32 dropout=0.1,
QLoRA NF4 with double quantisation, DPO beta=0.1 with the sigmoid loss, checkpoints at 25/50/75/100% of training.
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from refusal_probe.core.errors import UserError
from refusal_probe.core.settings import Settings, check_name, flag, read_toml
from refusal_probe.core.settings import opt as _opt
from refusal_probe.models.manifest import METHODS
from refusal_probe.models.quant import QUANT_TYPES

# ---- closed vocabularies: the CLI's choices, validation and the code's comparisons all read these ----


class Dtype(str, Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class DpoPairs(str, Enum):
    AUTO = "auto"
    WMT = "wmt"
    ON_POLICY = "on-policy"


class KeepOptimizer(str, Enum):
    RESUME = "resume"
    ALL = "all"


class TrainData(str, Enum):
    NTREX = "ntrex"
    MT_PREF = "mt-pref"


class PromptFormat(str, Enum):
    SEED = "seed"
    INSTRUCTED = "instructed"


class Device(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def choices_of(vocabulary: type[Enum]) -> tuple[str, ...]:
    return tuple(str(v.value) for v in vocabulary)


@functools.cache
def scheduler_names() -> tuple[str, ...]:
    """transformers' SchedulerType values (imported when a config is validated, not when the CLI starts)."""
    from transformers.trainer_utils import SchedulerType

    return choices_of(SchedulerType)


@functools.cache
def optimizer_names() -> tuple[str, ...]:
    """transformers' OptimizerNames values."""
    from transformers.training_args import OptimizerNames

    return choices_of(OptimizerNames)


LORA_PRESETS: dict[str, list[str]] = {
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    # The study's QLoRA script adapted every projection of the block.
    "qlora-all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
KNOWN_LANGS = ("de", "fr", "es", "it", "pt", "nl")

# Settings that change how a run executes but not what it learns: a run may resume with different values.
EXECUTION_ONLY = frozenset(
    {
        "device",
        "bf16",
        "gradient_checkpointing",
        "logging_steps",
        "keep_optimizer",
        "per_device_batch_size",
        "grad_accum",
        "run_name",
        "world_size",
    }
)


@dataclass
class TrainConfig(Settings):
    NOUN = "training setting"

    # What to train
    method: str = _opt(
        "lora",
        "Fine-tuning method: full | lora | qlora | dpo (full-parameter DPO unless --dpo-lora).",
        METHODS,
    )
    model: str = _opt(
        "qwen2.5-coder-0.5b-instruct", "Base model: hub id, local HF directory, .gguf file or embedded name."
    )
    run_name: str | None = _opt(None, "Run folder name under --out (default '<method>-lr<learning_rate>').")

    # Optimisation
    learning_rate: float = _opt(5e-5, "Peak learning rate (the study swept 1e-4, 5e-5, 1e-5, 5e-6).")
    epochs: float = _opt(1.0, "Passes over the training data (the study: one epoch).")
    max_steps: int | None = _opt(
        None, "Cap on optimizer steps; training stops at min(max_steps, steps of --epochs)."
    )
    per_device_batch_size: int = _opt(8, "Sequences per forward pass on each device.")
    grad_accum: int = _opt(
        1,
        "Gradient accumulation steps; effective batch = per-device batch x grad_accum x devices "
        "(the study: 8).",
    )
    lr_scheduler: str = _opt(
        "cosine",
        "Learning-rate schedule (any transformers SchedulerType, e.g. cosine, linear, constant_with_warmup).",
    )
    warmup_ratio: float = _opt(
        0.1, "Fraction of the steps spent warming the learning rate up linearly from 0."
    )
    weight_decay: float = _opt(0.1, "AdamW weight decay.")
    optim: str = _opt(
        "adamw_torch",
        "Optimizer name as transformers knows it (the study: adamw_torch; paged_adamw_8bit needs CUDA).",
    )
    seed: int = _opt(42, "Seed for data order, LoRA initialisation and dropout.")
    max_length: int = _opt(512, "Longest training sequence in tokens (prompt + answer); longer ones are cut.")
    dtype: str = _opt(
        "float32",
        "Weight dtype of the trained model. float32 keeps small updates exact; the study "
        "loaded bfloat16 weights.",
        choices_of(Dtype),
    )

    # LoRA / QLoRA
    lora_r: int = _opt(8, "LoRA rank.")
    lora_alpha: int = _opt(32, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = _opt(0.1, "Dropout on the LoRA input.")
    lora_targets: list[str] = _opt(
        list(LORA_PRESETS["attn"]),
        "Modules to adapt, comma-separated, or a preset: attn (q,k,v,o; the default), "
        "qlora-all (q,k,v,o,gate,up,down: the study's QLoRA), or peft's all-linear.",
    )
    qlora_quant_type: str = _opt("nf4", "4-bit quantisation of the QLoRA base.", QUANT_TYPES)
    qlora_double_quant: bool = _opt(
        True, "Quantise the quantisation constants too (QLoRA double quantisation)."
    )

    # DPO
    dpo_beta: float = _opt(0.1, "DPO beta: strength of the pull toward the reference model.")
    dpo_loss: str = _opt("sigmoid", "DPO loss type (TRL names: sigmoid, hinge, ipo, ...).")
    dpo_lora: bool = _opt(
        False, "Train DPO through a LoRA adapter instead of all parameters (the study: all)."
    )
    dpo_pairs: str = _opt(
        "auto",
        "Preference pairs: wmt (bundled WMT22/23 de-en system outputs, best vs worst chrF), "
        "on-policy (reference vs the base model's own greedy translation), auto (the "
        "dataset's own pairs for mt-pref, else wmt).",
        choices_of(DpoPairs),
    )

    # Checkpoints
    checkpoint_fractions: list[float] = _opt(
        [0.25, 0.5, 0.75, 1.0], "Save a checkpoint at these fractions of the total steps."
    )
    keep_optimizer: str = _opt(
        "resume",
        "Optimizer state to keep: resume (only the newest checkpoint's, enough to "
        "resume; deleted when the run completes) or all.",
        choices_of(KeepOptimizer),
    )

    # Data
    train_data: str = _opt(
        "ntrex",
        "Translation data: ntrex (bundled NTREX-128, offline, split by document) or "
        "mt-pref (sardinelab/MT-pref from the hub, filtered as the study did).",
        choices_of(TrainData),
    )
    langs: list[str] = _opt(["de", "fr", "es", "it", "pt"], "Source languages (X->English), comma-separated.")
    include_nl: bool = _opt(
        False, "mt-pref only: also keep Dutch, which the study's Latin-script filter let through."
    )
    n_train: int | None = _opt(
        None, "Use only this many training rows (balanced across languages); default all."
    )
    completion_only_loss: bool = _opt(
        True,
        "Loss on the answer tokens only (the study's full fine-tuning did this; "
        "its LoRA/QLoRA scripts trained on the whole chat).",
    )
    prompt_format: str = _opt(
        "seed",
        "User turn: seed (the raw source text, as in the study) or instructed "
        "('Translate the following <Language> text to English: ...').",
        choices_of(PromptFormat),
    )

    # Hardware
    device: str = _opt("auto", "Where to train: auto (cuda if available), cpu or cuda.", choices_of(Device))
    bf16: bool | None = _opt(
        None, "bfloat16 mixed precision; default on where CUDA supports it. Forced off on CPU."
    )
    gradient_checkpointing: bool = _opt(False, "Recompute activations to save memory. Forced off on CPU.")
    logging_steps: int = _opt(1, "Log the loss every this many steps.")

    # Safety-preserving options, weight space: EMA of parameters, layer freezing, projection off the refusal
    # direction, safety monitor (fields added here by their implementation)
    refusal_direction: str | None = _opt(
        None,
        "The base model's refusal direction: a folder written by `refusal-probe directions` (direction.json + "
        "directions.safetensors). Default: the shared direction cache's entry for the base, if any.",
    )
    ema_decay: float | None = _opt(
        None,
        "Exponential moving average of the trainable parameters (Kim et al. 2025): theta_ema <- D*theta_ema + "
        "(1-D)*theta after every step; checkpoints hold the averaged weights. Off by default; e.g. 0.99.",
    )
    freeze_layers: str | None = _opt(
        None,
        "Blocks whose parameters are not trained: a list '3,4,7', a range '10-14', or auto (the refusal "
        "direction's layer +- --freeze-neighbourhood).",
    )
    freeze_neighbourhood: int = _opt(
        2, "With --freeze-layers auto: freeze the direction's layer +- this many."
    )
    project_off_refusal: bool = _opt(
        False,
        "After every step remove the update's component along the base refusal direction r from every module "
        "that writes the residual stream: full W <- W_base + (I - r r^T)(W - W_base); LoRA B <- (I - r r^T) B.",
    )
    safety_monitor: bool = _opt(
        False,
        "Every --monitor-every steps measure the mean projection of harmful prompts on the base refusal "
        "direction; below --monitor-tolerance x its start, restore the last good state and lower the lr. "
        "Keeps the last good trainable weights and optimizer state in memory (about 3x the trainable size).",
    )
    monitor_every: int = _opt(10, "Steps between two safety-monitor checks.")
    monitor_tolerance: float = _opt(
        0.8, "The monitor rolls back when the signal falls below this fraction of its starting value."
    )
    monitor_lr_factor: float = _opt(0.5, "The monitor multiplies the learning rate by this at each rollback.")
    monitor_prompts: int = _opt(16, "Harmful prompts (bundled harmful_val) the monitor measures.")
    monitor_keyword_prompts: int = _opt(
        0,
        "A second monitor signal, off at 0: at each check the model answers the first N bundled harmful_val "
        "prompts greedily (up to --monitor-max-new-tokens) and the evaluation's keyword judge gives the refusal "
        "rate. A check rolls back when EITHER signal falls below --monitor-tolerance x its starting value.",
    )
    monitor_max_new_tokens: int = _opt(
        24, "Longest answer, in tokens, of the keyword signal (each stops early at a refusal keyword)."
    )

    # Safety-preserving options, gradients and losses: gradient surgery, EWC, refusal preservation, token
    # weighting (fields added here by their implementation)
    safety_prompts: int = _opt(
        16,
        "Harmful prompts (bundled harmful_train, disjoint from AdvBench) in the safety batch of --gradient-surgery "
        "and --ewc, each paired with the base model's own greedy answer (generated once, cached in the run "
        "folder), and the probe set of --refusal-preservation.",
    )
    safety_pairs: str | None = _opt(
        None,
        'A JSONL file of {"prompt": ..., "response": ...} lines to use as the safety batch instead of the '
        "base model's own answers.",
    )
    safety_max_new_tokens: int = _opt(
        64, "Longest base-model refusal generated for the safety batch, in tokens."
    )
    gradient_surgery: bool = _opt(
        False,
        "Every --surgery-every steps compute the safety gradient g_s (loss on the safety batch) and, where the "
        "task gradient g conflicts with it (g.g_s < 0), remove the conflict: g <- g - (g.g_s/|g_s|^2) g_s.",
    )
    surgery_every: int = _opt(1, "Steps between two gradient-surgery checks (1: every step).")
    surgery_mode: str = _opt(
        "global",
        "global (one dot product over all trainable parameters) or per-tensor (each parameter on its own).",
        ("global", "per-tensor"),
    )
    ewc: float | None = _opt(
        None,
        "EWC strength LAMBDA: adds LAMBDA * sum F_i (theta_i - theta_base_i)^2, F the diagonal Fisher of the "
        "safety loss at the base weights (estimated once on the safety batch, cached). Off by default.",
    )
    refusal_preservation: float | None = _opt(
        None,
        "Strength LAMBDA of a loss LAMBDA * (p - p_base)^2 keeping the harmful probe set's mean projection p on "
        "the base refusal direction (its layer's input, last post-instruction token) at its base value.",
    )
    token_weighting: bool = _opt(
        False,
        "Weight each answer token's loss by a safety score: w = 1 - alpha * max(0, cos(h, r)), h the base "
        "model's residual (at the refusal direction's layer) where the token is predicted; or --token-weights.",
    )
    token_weight_alpha: float = _opt(
        0.5, "alpha of the built-in token weight, in [0, 1]: w is in [1-alpha, 1]."
    )
    token_weights: str | None = _opt(
        None,
        'With --token-weighting: a JSONL file of {"index": i, "weights": [...]} lines, one weight >= 0 per '
        "answer token of training example i (examples without a line keep weight 1).",
    )

    # ---- derived ----
    @property
    def name(self) -> str:
        return self.run_name or default_run_name(self.method, self.learning_rate)

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_batch_size * self.grad_accum

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora") or (self.method == "dpo" and self.dpo_lora)

    def lora_modules(self) -> list[str] | str:
        if len(self.lora_targets) == 1 and self.lora_targets[0] in LORA_PRESETS:
            return list(LORA_PRESETS[self.lora_targets[0]])
        if self.lora_targets == ["all-linear"]:
            return "all-linear"
        return list(self.lora_targets)

    def validate(self) -> TrainConfig:
        """Raise UserError naming the first bad value; return self for chaining."""
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "a positive number")
        _check(self.epochs > 0, "epochs", self.epochs, "a positive number")
        _check(
            self.max_steps is None or self.max_steps > 0, "max_steps", self.max_steps, "a positive integer"
        )
        _check(
            self.per_device_batch_size > 0,
            "per_device_batch_size",
            self.per_device_batch_size,
            "a positive integer",
        )
        _check(self.grad_accum > 0, "grad_accum", self.grad_accum, "a positive integer")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "in [0, 1)")
        _check(self.max_length >= 8, "max_length", self.max_length, "at least 8 tokens")
        _check(self.lora_r > 0, "lora_r", self.lora_r, "a positive integer")
        _check(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "in [0, 1)")
        _check(
            bool(self.lora_targets), "lora_targets", self.lora_targets, "at least one module name or a preset"
        )
        _check(self.dpo_beta > 0, "dpo_beta", self.dpo_beta, "a positive number")
        fr = self.checkpoint_fractions
        _check(bool(fr) and all(0 < f <= 1 for f in fr), "checkpoint_fractions", fr, "values in (0, 1]")
        _check(self.n_train is None or self.n_train > 0, "n_train", self.n_train, "a positive integer")
        bad = [lang for lang in self.langs if lang not in KNOWN_LANGS]
        _check(not bad and bool(self.langs), "langs", self.langs, f"codes from {', '.join(KNOWN_LANGS)}")
        _check(
            self.run_name is None or ("/" not in self.run_name and not self.run_name.startswith(".")),
            "run_name",
            self.run_name,
            "a plain folder name",
        )
        self._validate_weight_space()
        self._validate_gradients_and_losses()
        self.check_choices()  # every closed vocabulary, from the field's own choices
        check_name(
            "lr_scheduler", self.lr_scheduler, scheduler_names(), "transformers SchedulerType", self.NOUN
        )
        check_name("optim", self.optim, optimizer_names(), "transformers OptimizerNames", self.NOUN)
        return self

    def _validate_weight_space(self) -> None:
        """Ranges of the weight-space safety options, and the combinations that make no sense."""
        from refusal_probe.train.safety.freeze import parse_layer_spec

        d = self.ema_decay
        _check(d is None or 0 < d < 1, "ema_decay", d, "in (0, 1), e.g. 0.99")
        if self.freeze_layers is not None:
            parse_layer_spec(self.freeze_layers)  # raises UserError naming the flag
        _check(self.freeze_neighbourhood >= 0, "freeze_neighbourhood", self.freeze_neighbourhood, ">= 0")
        _check(self.monitor_every >= 1, "monitor_every", self.monitor_every, "a positive integer")
        _check(self.monitor_tolerance > 0, "monitor_tolerance", self.monitor_tolerance, "a positive number")
        _check(0 < self.monitor_lr_factor <= 1, "monitor_lr_factor", self.monitor_lr_factor, "in (0, 1]")
        _check(self.monitor_prompts >= 1, "monitor_prompts", self.monitor_prompts, "a positive integer")
        n_kw = self.monitor_keyword_prompts
        _check(0 <= n_kw <= 39, "monitor_keyword_prompts", n_kw, "in 0..39 (harmful_val; 0 = off)")
        _check(
            self.monitor_max_new_tokens >= 1, "monitor_max_new_tokens", self.monitor_max_new_tokens, ">= 1"
        )
        if n_kw and not self.safety_monitor:
            raise UserError(
                "--monitor-keyword-prompts N is a signal of --safety-monitor; add it or drop the flag"
            )
        if self.project_off_refusal and self.uses_lora and self.lora_modules() != "all-linear":
            from refusal_probe.models.handle import RESIDUAL_WRITERS

            leaves = {w.rsplit(".", 1)[-1] for w in RESIDUAL_WRITERS}
            if not any(str(m).rsplit(".", 1)[-1] in leaves for m in self.lora_modules()):
                raise UserError(
                    f"--project-off-refusal: --lora-targets {','.join(self.lora_targets)} adapt no module that "
                    "writes the residual stream (o_proj, down_proj, ...), so there is nothing to project"
                )

    def _validate_gradients_and_losses(self) -> None:
        """Ranges of the gradient/loss safety options and the combinations that make no sense."""
        _check(
            0 < self.safety_prompts <= 143, "safety_prompts", self.safety_prompts, "in 1..143 (harmful_train)"
        )
        _check(
            self.safety_max_new_tokens > 0, "safety_max_new_tokens", self.safety_max_new_tokens, "positive"
        )
        _check(self.surgery_every > 0, "surgery_every", self.surgery_every, "a positive integer")
        for key in ("ewc", "refusal_preservation"):
            value = getattr(self, key)
            _check(value is None or (value >= 0 and math.isfinite(value)), key, value, "a finite number >= 0")
        _check(0 <= self.token_weight_alpha <= 1, "token_weight_alpha", self.token_weight_alpha, "in [0, 1]")
        if self.token_weights is not None and not self.token_weighting:
            raise UserError("--token-weights FILE needs --token-weighting; add it or drop --token-weights")
        if self.token_weighting and self.method == "dpo":
            raise UserError(
                "--token-weighting weights SFT answer tokens; DPO's loss compares whole answers: drop it or "
                "use --method full/lora/qlora"
            )
        if self.token_weighting and not self.completion_only_loss:
            raise UserError("--token-weighting weights answer tokens only; keep --completion-only-loss on")
        if self.safety_pairs is not None and not (self.gradient_surgery or self.ewc):
            raise UserError("--safety-pairs FILE is used by --gradient-surgery or --ewc; add one or drop it")


coerce = TrainConfig.coerce


def default_run_name(method: str, learning_rate: float) -> str:
    """'<method>-lr<lr>' with Python's float spelling (lora-lr5e-05, full-lr0.0001), as the study named its runs."""
    return f"{method}-lr{float(learning_rate)!r}"


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise UserError(f"training setting {key}={value!r} is invalid; expected {expected} ({flag(key)})")


def field_names() -> list[str]:
    return list(TrainConfig.settings_fields())


# ---- TOML files ----


def config_values(doc: dict[str, Any], method: str | None, where: str) -> dict[str, Any]:
    """Training settings from a TOML document: top-level keys or a [base] table, then [per_method.<method>].

    A sweep file (with [sweep]/[grid]/[base]) is also a valid --config for one run: its [grid] is ignored.
    """
    values = dict(doc.get("base", {}))
    values.update({k: v for k, v in doc.items() if k not in ("base", "grid", "per_method", "sweep")})
    method = method or values.get("method") or TrainConfig.method
    per_method = doc.get("per_method", {})
    if not isinstance(per_method, dict) or any(not isinstance(v, dict) for v in per_method.values()):
        raise UserError(f"{where}: [per_method.<method>] must be tables of settings")
    unknown = [m for m in per_method if m not in METHODS]
    if unknown:
        raise UserError(
            f"{where}: [per_method.{unknown[0]}] names no method; use one of {', '.join(METHODS)}"
        )
    values.update(per_method.get(method, {}))
    return values


# ---- CLI flags ----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--learning-rate ...), grouped; help and default from the field."""
    TrainConfig.add_arguments(parser, group=_group)


def _group(name: str) -> str:
    if name.startswith(("lora", "qlora")):
        return "LoRA / QLoRA"
    if name.startswith("dpo"):
        return "DPO"
    if name in ("checkpoint_fractions", "keep_optimizer"):
        return "checkpoints"
    if name in ("train_data", "langs", "include_nl", "n_train", "prompt_format", "completion_only_loss"):
        return "data"
    if name in ("device", "bf16", "gradient_checkpointing", "logging_steps"):
        return "hardware"
    if name in ("method", "model", "run_name"):
        return "run"
    if name in WEIGHT_SPACE_SAFETY:
        return "safety-preserving options, weight space"
    if name in GRADIENT_SAFETY:
        return "safety-preserving options, gradients and losses"
    return "optimisation"


GRADIENT_SAFETY = frozenset(
    {
        "safety_prompts",
        "safety_pairs",
        "safety_max_new_tokens",
        "gradient_surgery",
        "surgery_every",
        "surgery_mode",
        "ewc",
        "refusal_preservation",
        "token_weighting",
        "token_weight_alpha",
        "token_weights",
    }
)


WEIGHT_SPACE_SAFETY = frozenset(
    {
        "refusal_direction",
        "ema_decay",
        "freeze_layers",
        "freeze_neighbourhood",
        "project_off_refusal",
        "safety_monitor",
        "monitor_every",
        "monitor_tolerance",
        "monitor_lr_factor",
        "monitor_prompts",
        "monitor_keyword_prompts",
        "monitor_max_new_tokens",
    }
)


def build_config(config_file: str | Path | None, flags: dict[str, Any]) -> TrainConfig:
    """Defaults <- TOML file (base, then its per_method table) <- CLI flags; validated."""
    values: dict[str, Any] = {}
    where = "command line"
    if config_file is not None:
        doc = read_toml(config_file)
        method = flags.get("method")
        values = config_values(doc, str(method) if method else None, str(config_file))
        cfg = TrainConfig.from_dict(values, where=str(config_file))
        values = {k: getattr(cfg, k) for k in values}
    values.update({k: coerce(k, v, flag(k)) for k, v in flags.items()})
    return TrainConfig.from_dict(values, where=where).validate()
