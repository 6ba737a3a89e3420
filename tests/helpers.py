"""Plain helpers that several test modules share (fixtures stay in conftest.py): the repository
root, the CLI
runner, the tiny pretraining config and checkpoint comparison."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from common.config import load_config
from pretrain.schema import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]


def randomise_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, drawn from torch's global generator, so that
    a BN mix-up
    (statistics of one layer in another, or left at their defaults) shows in the features."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `python -m <args>` in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# The smallest pretraining run that still exercises every part of the loop (2 epochs of 3 steps on
# 48 images). optim.base_lr=1: the tiny runs' dynamics do not follow the small config's recipe
# (base_lr 4). crop_scale 0.5-1: the official sampler's small crops of 28 px images (blank strips)
# make 6 steps chaotic, so that 1 and 2 threads ended 3e-2 apart (1e-5 with these crops) and the
# two-process equivalence could not be told from rounding.
TINY = [
    "data.limit=48",
    "data.image_size=16",
    "data.num_workers=0",
    "optim.batch_size=16",
    "optim.epochs=2",
    "optim.base_lr=1.0",
    "augment.crop_scale=[0.5,1.0]",
    "optim.warmup_epochs=0.5",
    "model.projector_hidden=64",
    "model.predictor_hidden=64",
    "model.embedding_dim=32",
    "loss.num_features=64",
    "train.log_every=2",
    "train.checkpoint_every=100",
    "train.deterministic=true",
    "train.cpu_amp=false",
    "train.rankme_every=2",
]


def tiny_config(run_dir, *overrides):

    return load_config(
        PretrainConfig,
        ROOT / "configs/pretrain/fashion_mnist_resnet18.yaml",
        [f"run_dir={run_dir}", *TINY, *overrides],
    )


def final_state(run_dir):

    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)


def assert_same_weights(a, b):

    for part in ("online", "target", "ema", "loss"):
        if a[part] is None:
            assert b[part] is None
            continue
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
