"""Probing a checkpoint: refusal directions, their drift from the base model, and where the weights moved."""

DEFAULT_SEED = 42  # prompt sampling: `directions` and `analyze` must draw the same prompts for the same model
DEFAULT_BATCH_SIZE = 16  # prompts per forward pass
