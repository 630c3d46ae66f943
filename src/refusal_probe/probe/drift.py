"""How a checkpoint's refusal direction drifted from the base model's, and how separable harmful/harmless stay.

Pure functions over captured activations (no model or file I/O), computed in float64. Each returns tidy rows
``{"layer", "metric", "value"}`` that the caller tags with run/step and writes out.
"""

from __future__ import annotations

import math

import torch

from refusal_probe.core.errors import UserError
from refusal_probe.probe.activations import Activations
from refusal_probe.probe.measures import cosine, mean_difference, norm_ratio, project
from refusal_probe.probe.settings import SEPARABILITY_TEST_FRACTION

DRIFT_METRICS = ("cos_to_base", "norm_ratio", "proj_harmful", "proj_harmless", "proj_gap")
SEPARABILITY_METRICS = ("probe_acc", "diffmean_acc")


def _require_nonzero(r: torch.Tensor) -> None:
    if not bool(torch.linalg.vector_norm(r.to(torch.float64)) > 0):
        raise UserError(
            "the base refusal direction is zero: harmful and harmless means coincide at its layer"
        )


def directions(harmful: Activations, harmless: Activations) -> torch.Tensor:
    """Difference of means (harmful - harmless), float64 [L, P, d]: the candidate refusal directions."""
    if harmful.mean.shape != harmless.mean.shape or harmful.positions != harmless.positions:
        raise UserError(
            f"harmful activations {tuple(harmful.mean.shape)} at {harmful.positions} and harmless "
            f"{tuple(harmless.mean.shape)} at {harmless.positions} differ: capture both with the same model"
        )
    return mean_difference(harmful.mean, harmless.mean)


def drift_rows(
    base_dirs: torch.Tensor,
    ckpt_dirs: torch.Tensor,
    base_refusal_dir: torch.Tensor,
    harmful: Activations,
    harmless: Activations,
    position: int,
) -> list[dict]:
    """Per layer: cosine and norm ratio of the checkpoint's direction to the base's, and the refusal signal.

    ``proj_harmful``/``proj_harmless`` are the mean projections of the checkpoint's activations on the base model's
    chosen unit refusal direction (projection is linear, so the projection of the mean); ``proj_gap`` is their
    difference, i.e. how strongly the checkpoint still writes the base's refusal direction.
    """
    if base_dirs.shape != ckpt_dirs.shape:
        raise UserError(
            f"base directions {tuple(base_dirs.shape)} and checkpoint directions {tuple(ckpt_dirs.shape)} differ: "
            "a checkpoint must have the base model's architecture"
        )
    if harmful.mean.shape != base_dirs.shape or harmless.mean.shape != base_dirs.shape:
        raise UserError(
            f"activations {tuple(harmful.mean.shape)} do not match directions {tuple(base_dirs.shape)}"
        )
    if base_refusal_dir.shape != base_dirs.shape[-1:]:
        raise UserError(
            f"refusal direction has shape {tuple(base_refusal_dir.shape)}, expected ({base_dirs.shape[-1]},)"
        )
    _require_nonzero(base_refusal_dir)
    p = harmful.index(position)
    base, ckpt = base_dirs[:, p], ckpt_dirs[:, p]  # [L, d]
    columns = {
        "cos_to_base": cosine(ckpt, base),  # nan where a direction is zero (e.g. layer 0: same embeddings)
        "norm_ratio": norm_ratio(ckpt, base),
        # projection is linear: the mean of the projections is the projection of the mean
        "proj_harmful": project(harmful.mean[:, p], base_refusal_dir),
        "proj_harmless": project(harmless.mean[:, p], base_refusal_dir),
    }
    columns["proj_gap"] = columns["proj_harmful"] - columns["proj_harmless"]
    return [
        {"layer": layer, "metric": m, "value": float(columns[m][layer])}
        for layer in range(base.shape[0])
        for m in DRIFT_METRICS
    ]


def split_indices(y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified train/test split of sample indices, fixed by ``seed``."""
    from sklearn.model_selection import train_test_split

    counts = torch.bincount(y.long(), minlength=2)
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test fraction {test_fraction} must lie strictly between 0 and 1")
    if (
        int(counts.min()) < 2
        or min(int(counts.min() * test_fraction), int(counts.min() * (1 - test_fraction))) < 1
    ):
        raise UserError(
            f"too few prompts for a held-out probe ({int(counts[1])} harmful, {int(counts[0])} harmless) at test "
            f"fraction {test_fraction}: capture at least {math.ceil(1 / min(test_fraction, 1 - test_fraction))} per class"
        )
    try:
        train, test = train_test_split(
            torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed, stratify=y.numpy()
        )
    except ValueError as exc:
        raise UserError(f"cannot split {len(y)} prompts at test fraction {test_fraction}: {exc}") from exc
    return torch.as_tensor(train), torch.as_tensor(test)


def diffmean_accuracy(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor
) -> float:
    """Accuracy of projecting on the train difference of means, thresholded at the midpoint of the class means."""
    x_train, x_test = x_train.to(torch.float64), x_test.to(torch.float64)
    mu1, mu0 = x_train[y_train == 1].mean(0), x_train[y_train == 0].mean(0)
    direction = mu1 - mu0
    threshold = float((mu1 + mu0) @ direction) / 2.0
    pred = (x_test @ direction > threshold).long()
    return float((pred == y_test.long()).double().mean())


def probe_accuracy(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, seed: int = 0
) -> float:
    """Held-out accuracy of a logistic-regression probe on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(x_train.to(torch.float64).numpy(), y_train.numpy())
    return float(clf.score(x_test.to(torch.float64).numpy(), y_test.numpy()))


def separability_rows(
    harmful: Activations,
    harmless: Activations,
    position: int,
    seed: int = 0,
    test_fraction: float = SEPARABILITY_TEST_FRACTION,
) -> list[dict]:
    """Per layer held-out accuracy of a logistic probe (``probe_acc``) and of the diff-of-means rule (``diffmean_acc``)."""
    if harmful.per_prompt is None or harmless.per_prompt is None:
        raise UserError("separability needs per-prompt activations: capture both prompt sets with keep=True")
    directions(harmful, harmless)  # same shapes and positions, or a UserError
    p = harmful.index(position)
    x = torch.cat([harmful.per_prompt[:, :, p], harmless.per_prompt[:, :, p]]).to(torch.float64)  # [n, L, d]
    y = torch.cat([torch.ones(harmful.n, dtype=torch.long), torch.zeros(harmless.n, dtype=torch.long)])
    train, test = split_indices(y, test_fraction, seed)
    rows = []
    for layer in range(x.shape[1]):
        xl = x[:, layer]
        args = (xl[train], y[train], xl[test], y[test])
        rows.append({"layer": layer, "metric": "probe_acc", "value": probe_accuracy(*args, seed=seed)})
        rows.append({"layer": layer, "metric": "diffmean_acc", "value": diffmean_accuracy(*args)})
    return rows
