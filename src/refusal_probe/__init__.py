"""refusal-probe: what did fine-tuning do to a chat model's refusals, and where inside the model."""

__version__ = "0.1.0"
