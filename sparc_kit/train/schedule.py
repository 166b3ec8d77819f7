"""Learning-rate schedules counted in optimizer steps."""

from __future__ import annotations

import math

__all__ = ["lr_factor"]


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for the update that follows ``step`` completed steps.

    Linear warm-up from 1/warmup to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at
    ``total_steps`` (or constant).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
