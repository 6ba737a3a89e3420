"""LARS, the parameter groups that exclude biases and norm parameters, and the warmup + cosine
schedule."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from common.errors import UserError


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) as optax.lars computes it for BYOL /
    SSL-HSIC:

        g <- grad + weight_decay * p                      (groups with weight_decay > 0)
        g <- eta * ||p|| / ||g|| * g                      (groups with adapt=True, when both norms are > 0)
        v <- momentum * v + lr * g
        p <- p - v

    Momentum accumulates the lr-scaled update (optax's trace after scale), so an lr change affects
    only new
    steps. Groups with adapt=False and weight_decay=0 (biases, norm parameters) get plain momentum SGD.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 1e-3,
        adapt: bool = True,
    ):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ValueError(
                f"bad LARS settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                f"eta={eta}"
            )
        super().__init__(
            params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, adapt=adapt)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if group["weight_decay"]:
                    update = update.add(p, alpha=group["weight_decay"])
                if group["adapt"]:
                    param_norm, update_norm = (
                        torch.linalg.vector_norm(p),
                        torch.linalg.vector_norm(update),
                    )
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["eta"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    update = update * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update, alpha=group["lr"])
                p.sub_(buffer)
        return loss


def is_excluded(name: str, param: nn.Parameter) -> bool:
    """Biases and normalisation parameters (every parameter with fewer than 2 dimensions)."""
    return param.ndim < 2 or name.endswith(".bias")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decay + adaptation) and biases / norm parameters (neither)."""
    decayed, excluded = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (excluded if is_excluded(name, param) else decayed).append(param)
    return [
        dict(params=decayed, weight_decay=weight_decay, adapt=True),
        dict(params=excluded, weight_decay=0.0, adapt=False),
    ]


def build_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float, eta: float
) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=eta)
    for group in groups:
        group.pop("adapt")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise UserError(f"unknown optimizer '{name}'; choose lars, sgd or adamw (optim.name)")
