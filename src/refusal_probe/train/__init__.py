"""Fine-tuning runs (full, LoRA, QLoRA, DPO) that write checkpoint trees for the rest of the toolkit to read.

``refusal-probe train`` runs one configuration; ``refusal-probe sweep`` runs (or prints) a grid of them.
The heavy pieces (torch, transformers, TRL) are imported only when training starts. Modules: ``config`` (settings),
``lifecycle`` (new / resume / complete / refused), ``base`` (loading the base), ``examples`` (data), ``sft`` and
``dpo`` (the two trainer paths), ``trainer`` (either one, capped), ``runner`` (one run), ``sweep`` (a grid).
"""

from refusal_probe.train.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(config: TrainConfig, out_dir, callbacks=None):
    """Train one run into ``<out_dir>/<run name>/`` (see refusal_probe.train.runner.train)."""
    from refusal_probe.train.runner import train as _train

    return _train(config, out_dir, callbacks)
