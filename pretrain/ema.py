"""Exponential moving averages: the target network (cosine tau schedule) and the exported EMA
network."""

from __future__ import annotations

import math

import torch
from torch import nn


def target_tau(step: int, total_steps: int, base_tau: float) -> float:
    """BYOL's schedule tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2: tau_base at k = 0, 1
    at k = K."""
    return (
        1
        - (1 - base_tau)
        * (math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)) + 1)
        / 2
    )


@torch.no_grad()
def ema_update_(average: nn.Module, source: nn.Module, tau: float, buffers: bool = True) -> None:
    """average <- tau * average + (1 - tau) * source, for parameters and, with `buffers`,
    floating-point buffers (BN statistics; other buffers, BN's batch counter, are copied).

    The target network runs in train mode and keeps its own BN statistics (buffers=False); the
    exported EMA network never runs during training, so it averages the online network's
    (buffers=True)."""
    avg_params = [p for p in average.parameters()]
    src_params = [p.detach() for p in source.parameters()]
    torch._foreach_lerp_(avg_params, src_params, 1 - tau)
    if not buffers:
        return
    for avg_buffer, src_buffer in zip(average.buffers(), source.buffers()):
        if avg_buffer.is_floating_point():
            avg_buffer.lerp_(src_buffer, 1 - tau)
        else:
            avg_buffer.copy_(src_buffer)


def debiased_weight(updates: int, decay: float) -> float:
    """The weight of the newest value in a zero-debiased EMA after `updates` updates (haiku's
    ExponentialMovingAverage, zero_debias=True):

        h_t = decay h_{t-1} + (1 - decay) x_t,  h_0 = 0,   average_t = h_t / (1 - decay^t)

    is the same as average_t = lerp(average_{t-1}, x_t, w_t) with w_t = (1 - decay) / (1 - decay^t): w_1 = 1 (the
    first value is copied), then w_t falls to 1 - decay. Early in training the average is thus a
    mean of the recent networks, not mostly the random initialisation."""
    if updates < 1:
        raise ValueError(f"a zero-debiased EMA needs at least one update, got {updates}")
    return (1 - decay) / (1 - decay**updates) if decay < 1 else float(updates == 1)


@torch.no_grad()
def debiased_ema_update_(average: nn.Module, source: nn.Module, decay: float, updates: int) -> None:
    """The exported EMA network: parameters <- zero-debiased EMA of the online network's (`updates`
    counts this
    one), buffers (BatchNorm statistics) <- the online network's own, as the official code evaluates
    it."""
    weight = debiased_weight(updates, decay)
    torch._foreach_lerp_(
        list(average.parameters()), [p.detach() for p in source.parameters()], weight
    )
    for avg_buffer, src_buffer in zip(average.buffers(), source.buffers()):
        avg_buffer.copy_(src_buffer)
