"""Probing a checkpoint: refusal directions, their drift from the base model, and where the weights moved."""
