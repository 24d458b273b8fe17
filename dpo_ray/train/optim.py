"""The optimizer and the learning-rate schedule of train.optim."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["make_optimizer", "make_scheduler"]


def make_optimizer(model: Any, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, or RMSprop as in the DPO paper's reference code."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer: unknown {name!r}; expected adamw or rmsprop")


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: str) -> Any:
    """Linear warmup from 0, then constant or cosine decay to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
