"""Fine-tuning runs (full, LoRA, QLoRA, DPO) that write checkpoint trees for the rest of the toolkit to read.

``refusal-probe train`` runs one configuration; ``refusal-probe sweep`` runs (or prints) a grid of them.
The heavy pieces (torch, transformers, TRL) are imported by ``methods`` only when training starts.
"""

from refusal_probe.train.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(config: TrainConfig, out_dir, callbacks=None):
    """Train one run into ``<out_dir>/<run name>/`` (see refusal_probe.train.methods.train)."""
    from refusal_probe.train.methods import train as _train

    return _train(config, out_dir, callbacks)
