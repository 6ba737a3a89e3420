"""Label fractions: SimCLR's ImageNet subsets as shipped, and class-balanced subsets drawn from a
seed."""

from collections import Counter

import numpy as np
import pytest

from common.errors import UserError
from transfer.subsets import (
    balanced_subset,
    imagenet_subset,
    per_class_sample,
    stratified_holdout,
    write_split,
)


@pytest.mark.parametrize("percent, count", [(1, 12_811), (10, 128_116)])
def test_simclr_imagenet_subsets_as_published(percent, count):
    names = imagenet_subset(percent)
    assert len(names) == count and len(set(names)) == count
    assert len({name.split("_")[0] for name in names}) == 1000  # every class
    assert all(name.startswith("n") and name.endswith(".JPEG") for name in names)


def test_the_one_percent_subset_lies_inside_the_ten_percent():
    assert set(imagenet_subset(1)) <= set(imagenet_subset(10))
    with pytest.raises(UserError, match="5% is not published; choose 1 or 10"):
        imagenet_subset(5)


def test_a_balanced_subset_takes_each_classes_share_from_its_seed(tmp_path):
    labels = [0] * 100 + [1] * 50 + [2] * 3
    chosen = balanced_subset(labels, 0.1, seed=0)
    # round(0.3) = 0 -> at least one
    assert Counter(labels[i] for i in chosen) == {0: 10, 1: 5, 2: 1}
    assert chosen == sorted(set(chosen)) and chosen == balanced_subset(labels, 0.1, seed=0)
    assert chosen != balanced_subset(labels, 0.1, seed=1)
    with pytest.raises(UserError, match="label fraction 0 must be in"):
        balanced_subset(labels, 0, seed=0)
    path = write_split(tmp_path / "split.txt", [f"img{i}" for i in chosen])
    assert path.read_text().split() == [f"img{i}" for i in chosen]


def test_a_stratified_holdout_takes_each_classes_share_and_leaves_the_rest():
    labels = [0] * 100 + [1] * 10 + [2] * 2 + [3]
    keep, held = stratified_holdout(labels, 0.2, seed=3)
    # round(0.4) = 0 -> one; a class of one stays
    assert Counter(labels[i] for i in held) == {0: 20, 1: 2, 2: 1}
    assert keep == sorted(keep) and held == sorted(held)
    assert not set(keep) & set(held) and sorted(keep + held) == list(range(len(labels)))
    assert (keep, held) == stratified_holdout(labels, 0.2, seed=3)
    assert held != stratified_holdout(labels, 0.2, seed=4)[1]
    assert Counter(labels[i] for i in stratified_holdout(labels, 0.95, seed=3)[0]) == {
        0: 5,
        1: 1,
        2: 1,
        3: 1,
    }
    for fraction in (0, 1):
        with pytest.raises(UserError, match=rf"held-out fraction {fraction} must be in \(0, 1\)"):
            stratified_holdout(labels, fraction, seed=0)


def test_a_per_class_sample_takes_a_fixed_count_of_each_class():
    labels = [5] * 40 + [7] * 31 + [9] * 12
    chosen, rest = per_class_sample(labels, 30, seed=0)
    assert Counter(labels[i] for i in chosen) == {5: 30, 7: 30, 9: 12}
    assert Counter(labels[i] for i in rest) == {5: 10, 7: 1}
    assert sorted(chosen + rest) == list(range(len(labels))) and (chosen, rest) == per_class_sample(
        labels, 30, seed=0
    )
    assert chosen != per_class_sample(labels, 30, seed=1)[0]
    with pytest.raises(UserError, match="per-class count 0 must be at least 1"):
        per_class_sample(labels, 0, seed=0)


def test_a_smaller_fraction_lies_inside_a_larger_one_of_the_same_seed():
    labels = np.random.default_rng(0).integers(0, 7, 500)
    one, ten, half = (set(balanced_subset(labels, f, 4)) for f in (0.01, 0.1, 0.5))
    assert one < ten < half
