"""Label fractions: SimCLR's ImageNet subsets as shipped, and class-balanced subsets drawn from a seed."""
from collections import Counter

import pytest

from pretrain.errors import UserError
from transfer.subsets import balanced_subset, imagenet_subset, write_split


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
    assert Counter(labels[i] for i in chosen) == {0: 10, 1: 5, 2: 1}  # round(0.3) = 0 -> at least one
    assert chosen == sorted(set(chosen)) and chosen == balanced_subset(labels, 0.1, seed=0)
    assert chosen != balanced_subset(labels, 0.1, seed=1)
    with pytest.raises(UserError, match="label fraction 0 must be in"):
        balanced_subset(labels, 0, seed=0)
    path = write_split(tmp_path / "split.txt", [f"img{i}" for i in chosen])
    assert path.read_text().split() == [f"img{i}" for i in chosen]
