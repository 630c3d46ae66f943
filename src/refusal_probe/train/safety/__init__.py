"""Safety-preserving fine-tuning options (issue 9). Weight space: the base refusal direction (direction.py, the one
place train reads probe), EMA of parameters (ema.py), layer freezing (freeze.py), projection of updates off the
refusal direction (project.py) and the safety monitor with rollback (monitor.py)."""
