"""Learning-rate schedules as multipliers of the peak LR (for torch's LambdaLR)."""

from __future__ import annotations

import math
from typing import Callable

from ..configs import TrainConfig


def lr_multiplier(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine to ``min_lr_ratio``, WSD (stable then linear decay), or constant."""

    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "wsd":
            decay_steps = max(1, round(cfg.steps * cfg.wsd_decay_fraction))
            into_decay = step - (cfg.steps - decay_steps)
            if into_decay <= 0:
                return 1.0
            return 1.0 - (1.0 - cfg.min_lr_ratio) * min(1.0, into_decay / decay_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn
