"""What analyze measures in one model: activations on the prompt sets, drift and separability against the base
reference, and weight deltas (streamed from disk, never merged)."""

from __future__ import annotations

from typing import Any

from refusal_probe.analysis.settings import AnalyzeSettings
from refusal_probe.core.errors import UserError
from refusal_probe.core.io import read_json
from refusal_probe.probe.prompts import PromptSets


def capture_pair(model, tok, sets: PromptSets, settings: AnalyzeSettings, label: str):
    from refusal_probe.probe.activations import capture

    kw: dict[str, Any] = dict(
        batch_size=settings.batch_size,
        keep=settings.keep_per_prompt(),
        backend=settings.backend,
        progress=settings.progress,
    )
    harmful = capture(model, tok, sets["harmful_train"], desc=f"{label}: harmful", **kw)
    harmless = capture(model, tok, sets["harmless_train"], desc=f"{label}: harmless", **kw)
    return harmful, harmless


def internal_rows(ckpt_dirs, ref_result, harmful, harmless, settings: AnalyzeSettings) -> list[dict]:
    """Drift (vs the base's directions at the chosen position), direction norms, noise floors and separability per
    layer."""
    import torch

    from refusal_probe.probe.drift import drift_rows, separability_rows
    from refusal_probe.probe.noise import noise_rows

    pos = ref_result.position
    p = harmful.index(pos)
    rows = drift_rows(ref_result.directions, ckpt_dirs, ref_result.unit, harmful, harmless, pos)
    norms = torch.linalg.vector_norm(ckpt_dirs[:, p].to(torch.float64), dim=-1)
    rows += [{"layer": layer, "metric": "dir_norm", "value": float(v)} for layer, v in enumerate(norms)]
    rows += noise_rows(
        ref_result.directions,
        ckpt_dirs,
        harmful,
        harmless,
        pos,
        n_boot=settings.n_boot_prompts,
        n_splits=settings.n_split_halves,
        n_random=settings.n_random_directions,
        seed=settings.seed,
    )
    if settings.separability:
        rows += separability_rows(harmful, harmless, pos, seed=settings.seed)
    return rows


def check_causal_layers(model, settings: AnalyzeSettings) -> None:
    """Listed --causal-layers must exist in the model; checked before any activation is captured."""
    if settings.causal:
        from refusal_probe.models.handle import decoder_layers
        from refusal_probe.probe.causal import resolve_layers

        resolve_layers(settings.causal_layers, len(decoder_layers(model)), 0)


def causal_drift_rows(model, tok, sets: PromptSets, settings: AnalyzeSettings, result, own) -> list[dict]:
    """Causal drift rows (``probe.causal``) at the refusal layer, or at ``--causal-layers``; [] with --no-causal.

    ``own``: the model's own difference-of-means directions [L, P, d], or None for the base against itself.
    """
    if not settings.causal:
        return []
    from refusal_probe.probe.causal import causal_scores, resolve_layers
    from refusal_probe.probe.refusal_tokens import refusal_token_ids

    p = result.positions.index(result.position)
    layers = resolve_layers(settings.causal_layers, result.directions.shape[0], result.layer)
    scores = causal_scores(
        model,
        tok,
        sets["harmful_val"],
        sets["harmless_val"],
        {layer: result.directions[layer, p] for layer in layers},
        None if own is None else {layer: own[layer, p] for layer in layers},
        refusal_token_ids(tok),
        settings.batch_size,
    )
    return scores.rows(settings.n_boot_prompts)


def checkpoint_rows(ckpt, ref, settings: AnalyzeSettings, sets: PromptSets, prompts=None) -> dict[str, Any]:
    """Drift/separability and weight-delta rows of one fine-tuned checkpoint (and its per-prompt rows on the eval's
    AdvBench prompts, ``prompts``: ``per_prompt.EvalPrompts``)."""
    from refusal_probe.analysis.per_prompt import entry_block
    from refusal_probe.models.source import load_model
    from refusal_probe.probe.drift import directions as diff_of_means

    if ckpt.kind == "full":
        check_same_shape(ckpt, ref)
    model, tok = load_model(ckpt.path, base=ckpt.base, device=settings.device, quant=ckpt.quant)
    harmful, harmless = capture_pair(model, tok, sets, settings, label=ckpt.key)
    per_prompt = entry_block(model, tok, ref.result, settings.batch_size, prompts)
    dirs = diff_of_means(harmful, harmless)
    if dirs.shape != ref.directions.shape:
        raise UserError(
            f"{ckpt.path}: activations have shape {tuple(dirs.shape)} but the base {ref.spec} has "
            f"{tuple(ref.directions.shape)}; pass the right --base"
        )
    causal = causal_drift_rows(model, tok, sets, settings, ref.result, dirs)
    del model
    drift = internal_rows(dirs, ref.result, harmful, harmless, settings) + causal
    deltas: list[dict] = []
    if settings.deltas:
        from refusal_probe.models.source import resolve_model_dir
        from refusal_probe.probe.weights import weight_deltas

        if ckpt.base is None:
            raise UserError(
                f"{ckpt.path}: its base model is unknown, so weight deltas cannot be taken; pass --base"
            )
        # one refusal direction (the base's chosen one) for every layer: how much each update writes into it
        per_layer = {layer: ref.unit for layer in range(ref.directions.shape[0])}
        deltas = weight_deltas(ckpt.path, resolve_model_dir(ckpt.base), per_layer, progress=settings.progress)
    return {"drift": drift, "deltas": deltas, **per_prompt}


def check_same_shape(ckpt, ref) -> None:
    """Fail before loading anything when a full checkpoint cannot be a fine-tune of the base."""
    cfg = read_json(ckpt.path / "config.json")
    cfg = cfg.get("text_config") or cfg
    n_layers, _, d = ref.directions.shape
    got = (cfg.get("num_hidden_layers"), cfg.get("hidden_size"))
    if None not in got and got != (n_layers, d):
        raise UserError(
            f"{ckpt.path}: {got[0]} layers of width {got[1]}, but base {ref.spec} has {n_layers} of width {d}; "
            "pass the right --base"
        )
