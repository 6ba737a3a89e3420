"""Label fractions for fine-tuning with few labels.

ImageNet: SimCLR's published 1% and 10% subsets, shipped in transfer/splits/ (source and licence in
the README there): 12,811 and 128,116 training images covering all 1,000 classes, the 1% inside the
10%.

Any other dataset: `balanced_subset` draws, per class, round(fraction * n_c) of its n_c images (at
least one) from a seed; the run writes the chosen names into its run dir as a split file
(`write_split`), so that the subset is on record and a rerun reads the same one.

Splits drawn per class (the linear-transfer datasets, transfer/classify_datasets.py):
`stratified_holdout` holds out a validation share of each class of a training split,
`per_class_holdout` a given number of each class; `per_class_sample` takes a fixed number of each
class (Caltech-101's 30 training images per class)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from common.errors import UserError
from common.files import atomic_write_bytes

SPLITS = Path(__file__).with_name("splits")
IMAGENET_PERCENTS = (1, 10)


def imagenet_subset(percent: int) -> list[str]:
    """The file names (<wnid>_<number>.JPEG) of SimCLR's `percent`% ImageNet subset."""
    if percent not in IMAGENET_PERCENTS:
        raise UserError(f"ImageNet label fraction {percent}% is not published; choose 1 or 10")
    return (SPLITS / f"imagenet_{percent}percent.txt").read_text().split()


def balanced_subset(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Indices of a class-balanced subset: for each class c with n_c samples, max(1, round(fraction
    n_c)) of them, drawn from `seed` (`_split_per_class`); sorted. With one seed, a smaller
    fraction's subset lies inside a larger
    one's (as SimCLR's 1% inside its 10%)."""
    if not 0 < fraction <= 1:
        raise UserError(f"label fraction {fraction} must be in (0, 1]")
    return _split_per_class(labels, lambda n, _: max(1, round(fraction * n)), seed)[0]


def per_class_holdout(
    labels: Sequence[int], counts: dict[int, int], seed: int
) -> tuple[list[int], list[int]]:
    """(keep, held), both sorted: counts[c] samples of each class c held out (at most n_c - 1, so a
    class keeps a
    training sample; none of a class that counts does not name), drawn from `seed`."""
    held, keep = _split_per_class(labels, lambda n, c: min(n - 1, counts.get(c, 0)), seed)
    return keep, held


def _split_per_class(
    labels: Sequence[int], size: Callable[[int, int], int], seed: int
) -> tuple[list[int], list[int]]:
    """(chosen, rest), both sorted: for each class c (in increasing order) with n_c samples, the
    first size(n_c, c) of a permutation of its members drawn from one generator seeded by `seed`
    (numpy's PCG64). The permutation does
    not depend on size, so a smaller size chooses a subset of what a larger one chooses."""
    labels = np.asarray(labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen.extend(rng.permutation(members)[: size(len(members), int(c))].tolist())
    chosen_set = set(chosen)
    return sorted(chosen), [i for i in range(len(labels)) if i not in chosen_set]


def stratified_holdout(
    labels: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(keep, held), both sorted: a class-balanced validation draw. Of each class with n_c samples,
    round(fraction n_c) are held out, at least one and at most n_c - 1 (so a class keeps a training
    sample; a class of one sample
    stays whole in keep); drawn from `seed`, so the same labels and seed always hold out the same
    indices."""
    if not 0 < fraction < 1:
        raise UserError(f"held-out fraction {fraction} must be in (0, 1)")
    held, keep = _split_per_class(
        labels, lambda n, _: min(n - 1, max(1, round(fraction * n))), seed
    )
    return keep, held


def per_class_sample(labels: Sequence[int], count: int, seed: int) -> tuple[list[int], list[int]]:
    """(chosen, rest), both sorted: `count` samples of each class (all of a class with fewer),
    drawn from `seed`."""
    if count < 1:
        raise UserError(f"per-class count {count} must be at least 1")
    return _split_per_class(labels, lambda n, _: min(n, count), seed)


def write_split(path: str | Path, names: Sequence[str]) -> Path:
    """One name per line, atomically."""
    atomic_write_bytes(Path(path), "".join(f"{name}\n" for name in names).encode())
    return Path(path)
