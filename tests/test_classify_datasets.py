"""The linear-transfer datasets: tiny copies in their real on-disk layouts
(tests/classify_layouts.py), read by
torchvision's own classes (or this project's readers) into train / val / test splits."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from tests.classify_layouts import HEIGHT, WIDTH, WRITERS, shade, voc_labels
from transfer.classify_datasets import DATASETS, METRICS, ImageList, load_splits
from transfer.scenes import CLASSES, file_safe, generate, is_difficult, write_voc_detection

HELD_OUT = [name for name, info in DATASETS.items() if not info.standard_val]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, tuple[str, dict]]:
    """Every dataset written once: name -> (root, what load_splits should find)."""
    base = tmp_path_factory.mktemp("classify")
    return {name: (str(base / name), writer(base / name)) for name, writer in WRITERS.items()}


def fresh(name: str, tmp_path: Path) -> Path:
    """A copy of one dataset of the test's own, to damage."""
    WRITERS[name](tmp_path / name)
    return tmp_path / name


def identities(dataset) -> list:
    """What tells the items apart: the file paths, or (images in memory) the image bytes."""
    if isinstance(dataset, ImageList):
        return list(dataset.paths)
    return [dataset.images[i].tobytes() for i in range(len(dataset))]


def test_the_table_covers_the_thirteen_datasets():
    assert (
        list(DATASETS)
        == [
            "food101",
            "cifar10",
            "cifar100",
            "birdsnap",
            "sun397",
            "cars",
            "aircraft",
            "voc2007",
            "dtd",
            "pets",
            "caltech101",
            "flowers102",
            "digits",
        ]
        == list(WRITERS)
    )
    assert {info.metric for info in DATASETS.values()} == set(METRICS)
    assert [n for n, i in DATASETS.items() if i.standard_val] == [
        "aircraft",
        "voc2007",
        "dtd",
        "flowers102",
    ]
    assert [n for n, i in DATASETS.items() if i.multilabel] == ["voc2007"]
    assert [n for n, i in DATASETS.items() if i.metric == "mean_per_class"] == [
        "aircraft",
        "pets",
        "caltech101",
        "flowers102",
    ]


@pytest.mark.parametrize("name", list(DATASETS))
def test_each_dataset_reads_its_standard_splits(name, layouts):
    root, want = layouts[name]
    info = DATASETS[name]
    splits = load_splits(name, root, seed=0)
    assert splits.classes == want["classes"]
    assert (splits.metric, splits.multilabel) == (info.metric, info.multilabel)
    assert len(splits.test) == want["test"]
    if info.standard_val:
        assert (len(splits.train), len(splits.val), splits.val_source) == (
            want["train"],
            want["val"],
            "standard",
        )
    else:
        assert len(splits.train) + len(splits.val) == want["train"]
        assert splits.val_source.endswith(
            "held out of train, seed 0"
        ) or splits.val_source.endswith("held out per class, seed 0")
    for dataset in (splits.train, splits.val, splits.test):
        assert len(dataset.labels) == len(dataset)
        for index in range(len(dataset)) if name != "digits" else (0, len(dataset) - 1):
            image, label = dataset[index]
            assert image.dtype == torch.uint8 and tuple(image.shape) == (3, *want["size"])
            if info.multilabel:
                assert torch.equal(label, dataset.labels[index])
                continue
            assert (
                isinstance(label, int)
                and label == dataset.labels[index]
                and 0 <= label < len(splits.classes)
            )
            # the writer's red channel names the class the image was filed under
            if name != "digits":
                assert abs(image[0].float().mean().item() - shade(label)) < 4, (name, index, label)


def expected_val_counts(rule: str, train: Counter, test: Counter) -> dict:
    """Per class, what BYOL's Table 10 rule holds out of a class of n training images (keeping at
    least one)."""
    if rule.endswith("%"):
        return {c: min(n - 1, max(1, round(float(rule[:-1]) / 100 * n))) for c, n in train.items()}
    count = rule.split("/")[0]
    wanted = {c: (test[c] if count == "test" else int(count)) for c in train}
    return {c: min(train[c] - 1, wanted[c]) for c in train if min(train[c] - 1, wanted[c]) > 0}


def test_the_hold_out_rules_are_byols_table_10():
    assert {name: info.holdout for name, info in DATASETS.items() if not info.standard_val} == {
        "food101": "10%",
        "cifar10": "10%",
        "cifar100": "10%",
        "birdsnap": "test/class",
        "sun397": "10/class",
        "cars": "20%",
        "pets": "20/class",
        "caltech101": "5/class",
        "digits": "20%",
    }


@pytest.mark.parametrize("name", HELD_OUT)
def test_held_out_validation_follows_the_published_rule_is_disjoint_and_drawn_from_the_seed(
    name, layouts
):
    root, _ = layouts[name]
    first, again, other = (load_splits(name, root, seed=seed) for seed in (0, 0, 1))
    counts = Counter(first.train.labels) + Counter(first.val.labels)
    rule = DATASETS[name].holdout
    assert Counter(first.val.labels) == expected_val_counts(
        rule, counts, Counter(first.test.labels)
    )
    train, val = identities(first.train), identities(first.val)
    assert not set(train) & set(val) and len(set(train)) == len(train) and len(set(val)) == len(val)
    assert identities(again.train) == train and identities(again.val) == val
    assert identities(other.val) != val
    assert sorted(identities(other.train) + identities(other.val)) == sorted(train + val)
    # the test split never moves with the seed
    assert identities(other.test) == identities(first.test)
    assert "seed 1" in other.val_source
    half = load_splits(name, root, seed=0, val_fraction=0.5)  # a user's share overrides the rule
    assert Counter(half.val.labels) == expected_val_counts("50%", counts, Counter())
    assert half.val_source == "50% of train held out per class, seed 0"
    assert identities(half.test) == identities(first.test)


def test_caltech101_has_102_classes_with_background_and_trains_on_30_images_of_each_drawn_once(
    layouts,
):
    """Kornblith et al.'s Caltech-101: BACKGROUND_Google is a class (torchvision's reader drops it);
    30 training
    images per class, the same for every seed."""
    root, _ = layouts["caltech101"]
    runs = [load_splits("caltech101", root, seed=seed) for seed in (0, 7)]
    for splits in runs:
        assert splits.classes == ["BACKGROUND_Google", "accordion", "airplanes", "anchor"]
        assert Counter(splits.train.labels) + Counter(splits.val.labels) == {
            0: 30,
            1: 30,
            2: 30,
            3: 30,
        }
        assert Counter(splits.test.labels) == {0: 3, 1: 2, 2: 4, 3: 1}
    assert runs[0].test.paths == runs[1].test.paths and runs[0].val.paths != runs[1].val.paths
    gray = str(Path(root) / "caltech101" / "101_ObjectCategories" / "accordion" / "image_0001.jpg")
    gray_image = next(
        d[d.paths.index(gray)][0]
        for d in (runs[0].train, runs[0].val, runs[0].test)
        if gray in d.paths
    )
    # expanded
    assert gray_image.shape == (3, HEIGHT, WIDTH) and torch.equal(gray_image[0], gray_image[1])


def test_digits_test_split_is_30_percent_of_each_class_for_every_seed():
    runs = [load_splits("digits", "/nonexistent", seed=seed) for seed in (0, 3)]
    for splits in runs:
        assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
        pool = (
            Counter(splits.train.labels) + Counter(splits.val.labels) + Counter(splits.test.labels)
        )
        assert Counter(splits.test.labels) == {c: round(0.3 * n) for c, n in pool.items()}
        assert splits.train.images.max() == 255 and splits.train.images.dtype == np.uint8
    assert (
        np.array_equal(runs[0].test.images, runs[1].test.images)
        and runs[0].test.labels == runs[1].test.labels
    )
    assert not np.array_equal(runs[0].val.images, runs[1].val.images)


def test_voc2007_labels_mark_difficult_only_classes_zero(layouts):
    root, _ = layouts["voc2007"]
    splits = load_splits("voc2007", root)
    for split in ("train", "val", "test"):
        labels = getattr(splits, split).labels
        assert labels.dtype == torch.int8 and np.array_equal(labels.numpy(), voc_labels(split))
    chair = splits.classes.index("chair")
    assert splits.train.labels[0, chair] == 1  # one chair difficult, one not: present
    assert splits.train.labels[3, splits.classes.index("car")] == 0  # only a difficult car
    assert (
        splits.val.labels[1, splits.classes.index("cat")] == 0
        and splits.val.labels[1].tolist().count(-1) == 19
    )
    assert splits.test.labels[2, splits.classes.index("car")] == 1


def test_voc2007_reads_the_layout_transfer_scenes_writes(tmp_path):
    """scenes' VOC2007/ (no VOCdevkit/, Fashion-MNIST class names, trainval + test only): the
    missing standard
    validation split is named; with train.txt / val.txt added, the classes are the names found,
    sorted."""
    rng = np.random.default_rng(0)
    objects, labels = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), rng.integers(0, 10, 20)
    scenes = {
        "train": generate(6, 48, 1, objects, labels),
        "val": generate(3, 48, 2, objects, labels),
    }
    voc = write_voc_detection(tmp_path, scenes)
    with pytest.raises(
        UserError,
        match=r"^voc2007's validation split is missing: expected .*ImageSets/Main/train.txt "
        r"and val.txt",
    ):
        load_splits("voc2007", str(tmp_path))
    main = voc / "ImageSets" / "Main"
    ids = main.joinpath("trainval.txt").read_text().split()
    main.joinpath("train.txt").write_text("\n".join(ids[:4]) + "\n")
    main.joinpath("val.txt").write_text("\n".join(ids[4:]) + "\n")
    splits = load_splits("voc2007", str(tmp_path))
    found = {
        file_safe(CLASSES[o.category])
        for group in scenes.values()
        for s in group
        for o in s.instances
    }
    assert splits.classes == sorted(found) and (
        len(splits.train),
        len(splits.val),
        len(splits.test),
    ) == (4, 2, 3)
    for labels, scene in zip(splits.test.labels, scenes["val"]):
        for c, name in enumerate(splits.classes):
            kinds = {
                is_difficult(o) for o in scene.instances if file_safe(CLASSES[o.category]) == name
            }
            assert labels[c] == (1 if False in kinds else 0 if kinds else -1)
    assert splits.test[0][0].shape == (3, 48, 48)


def test_sun397_partition_files_may_lie_in_root(tmp_path):
    root = fresh("sun397", tmp_path)
    for listing in (root / "Partitions").iterdir():
        listing.rename(root / listing.name)
    splits = load_splits("sun397", str(root))
    assert splits.test.paths == [
        str(root / "SUN397" / line.lstrip("/"))
        for line in (root / "Testing_01.txt").read_text().split()
    ]
    assert len(splits.train) + len(splits.val) == 15


def test_birdsnap_leaves_out_test_images_never_fetched(layouts, caplog):
    root, _ = layouts["birdsnap"]
    with caplog.at_level("WARNING", logger="transfer"):
        splits = load_splits("birdsnap", root)
    assert "1 of the 7 test images listed" in caplog.text and len(splits.test) == 6
    assert not {Path(p).name for p in splits.train.paths + splits.val.paths} & {
        Path(p).name for p in splits.test.paths
    }


# ------------------------------------------------------------------------------------------ errors


def test_an_unknown_name_or_fraction_is_refused(layouts):
    with pytest.raises(
        UserError,
        match=r"^unknown classification dataset 'imagenet'; choose one of food101, cifar10, ",
    ):
        load_splits("imagenet", "/tmp")
    for fraction in (0, 1, 1.5):
        with pytest.raises(UserError, match=rf"^val_fraction {fraction} must be in \(0, 1\)"):
            load_splits("food101", layouts["food101"][0], val_fraction=fraction)


def test_a_missing_root_names_the_expected_layout(tmp_path):
    with pytest.raises(
        UserError, match=r"^cars: data root .*/nowhere does not exist; expected root/stanford_cars/"
    ):
        load_splits("cars", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("name", [name for name in DATASETS if name != "digits"])
def test_an_empty_root_is_a_missing_dataset_and_stays_empty(name, tmp_path):
    with pytest.raises(
        UserError,
        match=rf"^{name} under {tmp_path} is missing or incomplete \(.*\); expected root/",
    ):
        load_splits(name, str(tmp_path))
    # nothing created (torchvision's Caltech101 would make root/caltech101)
    assert not list(tmp_path.iterdir())


def test_a_partial_dataset_names_what_is_missing(tmp_path):
    root = fresh("food101", tmp_path / "a")
    (root / "food-101" / "images" / "baklava" / "1002.jpg").unlink()
    with pytest.raises(
        UserError,
        match=r"^food101 under .* is incomplete: 1 of the 15 train images are missing, e\.g\. "
        r".*baklava/1002\.jpg; expected root/food-101/",
    ):
        load_splits("food101", str(root))
    root = fresh("cifar10", tmp_path / "b")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(
        UserError,
        match=r"^cifar10 under .* is missing or incomplete \(not found\); expected "
        r"root/cifar-10-batches-py/",
    ):
        load_splits("cifar10", str(root))
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02}q")  # truncated pickle
    with pytest.raises(UserError, match=r"^cifar10 under .* is missing or incomplete"):
        load_splits("cifar10", str(root))
    root = fresh("sun397", tmp_path / "c")
    (root / "SUN397" / "c" / "canyon" / "sun_c0006.jpg").unlink()
    with pytest.raises(
        UserError,
        match=r"^sun397 under .* is missing or incomplete \(1 of the 6 images Testing_01.txt "
        r"lists are missing: .*/SUN397/c/canyon/sun_c0006.jpg\)",
    ):
        load_splits("sun397", str(root))
    root = fresh("cars", tmp_path / "d")
    (root / "stanford_cars" / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(
        UserError, match=r"^cars under .* is missing or incomplete \(not found\); expected "
    ):
        load_splits("cars", str(root))
    root = fresh("birdsnap", tmp_path / "e")
    (root / "species.txt").unlink()
    with pytest.raises(
        UserError,
        match=r"^birdsnap under .* is missing or incomplete \(No such file or directory: "
        r".*species.txt\)",
    ):
        load_splits("birdsnap", str(root))


def test_a_corrupt_image_is_named_when_read(tmp_path):
    root = fresh("dtd", tmp_path)
    path = root / "dtd" / "dtd" / "images" / "banded" / "banded_0001.jpg"
    path.write_bytes(b"not a jpeg")
    splits = load_splits("dtd", str(root))
    with pytest.raises(UserError, match=r"^cannot read image .*banded_0001.jpg: "):
        splits.train[splits.train.paths.index(str(path))]


@pytest.mark.parametrize(
    "name, remove, where",
    [
        ("dtd", "dtd/dtd/labels/val1.txt", r"dtd/dtd/labels/val1\.txt"),
        (
            "aircraft",
            "fgvc-aircraft-2013b/data/images_variant_val.txt",
            r"data/images_variant_val\.txt",
        ),
        (
            "voc2007",
            "VOCdevkit/VOC2007/ImageSets/Main/val.txt",
            r"ImageSets/Main/train\.txt and val\.txt",
        ),
        ("flowers102", None, r"the 'valid' ids in .*flowers-102/setid\.mat"),
    ],
)
def test_a_missing_standard_validation_split_is_named(name, remove, where, tmp_path):
    root = fresh(name, tmp_path)
    if remove:
        (root / remove).unlink()
    else:
        from scipy.io import loadmat, savemat

        setid = loadmat(root / "flowers-102" / "setid.mat")
        savemat(
            root / "flowers-102" / "setid.mat", {"trnid": setid["trnid"], "tstid": setid["tstid"]}
        )
    with pytest.raises(
        UserError, match=rf"^{name}'s validation split is missing: expected .*{where}"
    ):
        load_splits(name, str(root))
