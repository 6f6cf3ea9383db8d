"""AdamW with linear warm-up, then a constant or cosine schedule (stepped once per step)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for 0-based training step `step`.

    Warm-up is linear over the first `warmup_steps` steps, reaching the peak at the last
    warm-up step (step 0 trains at peak/warmup, never at 0). Then `constant` stays at the
    peak and `cosine` decays to 0 at `total_steps`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r} (constant, cosine)")


def build_optimizer(
    params: Iterable[torch.nn.Parameter], *, learning_rate: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over all trainable parameters (decay on all of them, as verl does)."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(
        params,
        lr=learning_rate,
        weight_decay=weight_decay,
        betas=(0.9, 0.999),
        eps=1e-8,
        fused=fused,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(
            step, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
