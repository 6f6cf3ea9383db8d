"""AdamW with verl's learning-rate schedule: linear warm-up from 0, then constant or cosine.

The schedule is verl's own (verl.utils.torch_functional `get_constant_schedule_with_warmup`
and `get_cosine_schedule_with_warmup`, as verl's FSDP engine builds them for an actor with
`min_lr_ratio` 0, `num_cycles` 0.5 and 0-indexed steps), which is also the seed's (verl 0.5):
a test compares it with verl's functions value by value. The verl engine path uses verl's
scheduler itself, configured to the same thing by `psft.trainer.verl.config`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for 0-based training step `step`.

    Warm-up is linear from 0 over the first `warmup_steps` steps: step s < warmup trains at
    s / warmup (so step 0 trains at lr 0, as in verl and the seed: AdamW's moments see its
    gradient, the weights do not move) and the peak is reached at step `warmup_steps`.
    Then `constant` stays at the peak and `cosine` follows half a cosine from the peak at
    step `warmup_steps` to 0 at `total_steps`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r} (constant, cosine)")
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if schedule == "constant":
        return 1.0
    # written as verl writes it (min_lr_ratio 0: coefficient and intercept 0.5), so the
    # floating-point result is the same number, not merely a close one
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    return max(0.0, math.cos(math.pi * progress) * 0.5 + 0.5)


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
