"""The learning-rate schedule every loop of the project trains with: a linear warmup, then a
cosine decay."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """BYOL's schedule (byol/utils/schedules.py), which SSL-HSIC trains with:

    lr_k = peak_lr * k / W                                            for k < W (0 at step 0)
    lr_k = peak_lr * (1 + cos(pi * min(k - W, K - W) / (K - W))) / 2   after, 0 at step K
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int = 0):
    """LambdaLR with lr_k = lr_0 k / W for k < W, then lr_0 (1 + cos(pi min(k - W, K - W) / (K -
    W))) / 2, K =
    total_steps (warmup_cosine above; W = 0: a plain cosine decay)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: warmup_cosine(k, total_steps, warmup_steps, 1.0)
    )
