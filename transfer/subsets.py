"""Label fractions for fine-tuning with few labels.

ImageNet: SimCLR's published 1% and 10% subsets, shipped in transfer/splits/ (source and licence in the README
there): 12,811 and 128,116 training images covering all 1,000 classes, the 1% inside the 10%.

Any other dataset: `balanced_subset` draws, per class, round(fraction * n_c) of its n_c images (at least one)
from a seed; the run writes the chosen names into its run dir as a split file (`write_split`), so that the
subset is on record and a rerun reads the same one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pretrain.errors import UserError

SPLITS = Path(__file__).with_name("splits")
IMAGENET_PERCENTS = (1, 10)


def imagenet_subset(percent: int) -> list[str]:
    """The file names (<wnid>_<number>.JPEG) of SimCLR's `percent`% ImageNet subset."""
    if percent not in IMAGENET_PERCENTS:
        raise UserError(f"ImageNet label fraction {percent}% is not published; choose 1 or 10")
    return (SPLITS / f"imagenet_{percent}percent.txt").read_text().split()


def balanced_subset(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Indices of a class-balanced subset: for each class c with n_c samples, max(1, round(fraction n_c)) of them,
    drawn without replacement from a generator seeded by `seed`; sorted."""
    if not 0 < fraction <= 1:
        raise UserError(f"label fraction {fraction} must be in (0, 1]")
    labels = np.asarray(labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen.extend(rng.choice(members, size=max(1, round(fraction * len(members))), replace=False).tolist())
    return sorted(chosen)


def write_split(path: str | Path, names: Sequence[str]) -> Path:
    """One name per line, atomically."""
    from pretrain.io import atomic_write_bytes
    atomic_write_bytes(Path(path), "".join(f"{name}\n" for name in names).encode())
    return Path(path)
