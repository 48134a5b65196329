"""Learning-rate schedule: linear warm-up, then constant (MDLM) or cosine decay."""

from __future__ import annotations

import math

from loopmdm.config import TrainConfig


def learning_rate(step: int, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """LR for optimizer step `step` (0-based). Cosine decays to min_lr_ratio * lr at total_steps
    (train.max_steps); without a step budget (FLOPs- or time-limited runs) it stays constant."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant" or not total_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))
