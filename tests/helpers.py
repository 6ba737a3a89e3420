"""Plain helpers that several test modules share (fixtures stay in conftest.py)."""
from __future__ import annotations

import torch


def randomise_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, drawn from torch's global generator, so that a BN mix-up
    (statistics of one layer in another, or left at their defaults) shows in the features."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model
