"""The lower layer every stage shares: errors, atomic io, hashing, chat template, batching, generation, settings.

Nothing here imports another refusal_probe subpackage (tests/test_layers.py enforces the layering).
"""
