"""The linear-transfer classification datasets of Kornblith et al. (2019) (BYOL appendix D), with
their splits.

`load_splits(name, root, seed, val_fraction)` gives train / val / test datasets whose items are
(uint8 image tensor [3, H, W] RGB, label), read lazily from disk (grayscale expanded to three
channels), plus the class names and the metric the dataset reports. Every split has a `labels`
attribute, available without decoding an image: a list of class indices, or for the multi-label
VOC2007 an int8 tensor [N, 20] in VOC's classification convention (1 present, -1 absent, 0 only
'difficult' instances), whose row an item returns as its label.

Splits: each dataset's standard train / test partition. Where the dataset has a standard validation
split (FGVC Aircraft, VOC2007, DTD, Flowers-102) it is the validation split; otherwise a part of the
training split is held out from `seed` as BYOL's appendix D.1 (Table 10) holds it out
(DatasetInfo.holdout): 10% of each class for Food-101 and CIFAR, 20% for Cars, 10 images per class
for SUN397 (40 train + 10 val), 20 for Pets, 5 for Caltech-101 (25 train + 5 val), and for Birdsnap
as many per class as the test split holds. The test split never depends on `seed`: Caltech-101's
split (30 random images per class for training, the rest for test) and the digits' (30% of each
class for test) are drawn from the fixed seed 0.

Torchvision's dataset classes read the metadata (never downloading); this module checks that every
listed image is on disk, so a partial copy fails at once with a message naming the dataset, the root
and the expected layout (except Birdsnap's test images that get_birdsnap.py could not fetch: those
are left out, with a warning). CIFAR's and Flowers-102's files are checked for presence rather than
against torchvision's MD5 sums of the official downloads, so that any copy in the layout reads (the
tests' tiny ones too); a damaged file still fails, when it is unpickled or loaded. Birdsnap, which
torchvision lacks, is read from its official release (species.txt, test_images.txt, and the images
that get_birdsnap.py fetched); VOC2007 from its XML annotations, in VOCdevkit's layout or the bare
VOC2007/ folder that transfer/scenes.py writes."""

from __future__ import annotations

import logging
import os
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
from xml.etree import ElementTree

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import (
    CIFAR10,
    CIFAR100,
    DTD,
    SUN397,
    FGVCAircraft,
    Flowers102,
    Food101,
    OxfordIIITPet,
    StanfordCars,
)

from common.errors import UserError
from pretrain.data import IMAGE_SUFFIXES
from transfer.subsets import per_class_holdout, per_class_sample, stratified_holdout

log = logging.getLogger("transfer")

METRICS = ("top1", "mean_per_class", "voc07_map")
VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
CALTECH_TRAIN_PER_CLASS = 30
DIGITS_TEST_FRACTION = 0.3
# Caltech-101's and the digits' train / test draws: the same test set for every run seed
FIXED_SPLIT_SEED = 0


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    metric: str  # one of METRICS
    layout: str  # the expected on-disk layout under the data root, in one line
    standard_val: bool  # False: val is held out of train, as `holdout` says
    multilabel: bool
    holdout: str = (
        ""  # BYOL's Table 10 / App. D.1: "10%" of each class, "20/class" images of each class, or
    )
    #                      "test/class": as many of each class as the test split holds


@dataclass
class ClassifySplits:
    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    metric: str
    multilabel: bool
    val_source: str  # "standard", or how val was held out of train


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "food101",
            "top1",
            "root/food-101/{images/<class>/<id>.jpg, meta/train.json, meta/test.json}",
            False,
            False,
            "10%",
        ),
        DatasetInfo(
            "cifar10",
            "top1",
            "root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (the python "
            "version)",
            False,
            False,
            "10%",
        ),
        DatasetInfo(
            "cifar100",
            "top1",
            "root/cifar-100-python/{train, test, meta} (the python version)",
            False,
            False,
            "10%",
        ),
        DatasetInfo(
            "birdsnap",
            "top1",
            "root/{species.txt, test_images.txt, images/<species dir>/<image>.jpg} (the "
            "official release, images fetched by its get_birdsnap.py)",
            False,
            False,
            "test/class",
        ),
        DatasetInfo(
            "sun397",
            "top1",
            "root/SUN397/{ClassName.txt, <letter>/<class>/sun_*.jpg} with Training_01.txt and "
            "Testing_01.txt in root or root/Partitions",
            False,
            False,
            "10/class",
        ),
        DatasetInfo(
            "cars",
            "top1",
            "root/stanford_cars/{cars_train/, cars_test/, cars_test_annos_withlabels.mat, "
            "devkit/{cars_meta.mat, cars_train_annos.mat}}",
            False,
            False,
            "20%",
        ),
        DatasetInfo(
            "aircraft",
            "mean_per_class",
            "root/fgvc-aircraft-2013b/data/{images/<id>.jpg, variants.txt, "
            "images_variant_{train,val,test}.txt}",
            True,
            False,
        ),
        DatasetInfo(
            "voc2007",
            "voc07_map",
            "root/VOCdevkit/VOC2007 (or root/VOC2007)/{JPEGImages/<id>.jpg, "
            "Annotations/<id>.xml, ImageSets/Main/{train,val,test}.txt}",
            True,
            True,
        ),
        DatasetInfo(
            "dtd",
            "top1",
            "root/dtd/dtd/{images/<class>/<image>.jpg, labels/{train1,val1,test1}.txt}",
            True,
            False,
        ),
        DatasetInfo(
            "pets",
            "mean_per_class",
            "root/oxford-iiit-pet/{images/<Breed>_<n>.jpg, annotations/{trainval,test}.txt}",
            False,
            False,
            "20/class",
        ),
        DatasetInfo(
            "caltech101",
            "mean_per_class",
            "root/caltech101/101_ObjectCategories/{BACKGROUND_Google, <class>}/image_NNNN.jpg",
            False,
            False,
            "5/class",
        ),
        DatasetInfo(
            "flowers102",
            "mean_per_class",
            "root/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}",
            True,
            False,
        ),
        DatasetInfo(
            "digits",
            "top1",
            "none: scikit-learn's bundled copy (load_digits; root is not read)",
            False,
            False,
            "20%",
        ),
    )
}


# ------------------------------------------------------------------------------------------
# datasets


def read_rgb(path: str) -> torch.Tensor:
    """The image at `path` as a uint8 tensor [3, H, W]: RGB, grayscale / palette / CMYK
    converted, alpha dropped."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except OSError as error:
        raise UserError(
            f"cannot read image {path}: {' '.join(str(error).split())[:200]}"
        ) from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageList(Dataset):
    """Image files with their labels: class indices, or label rows of an int8 tensor [N, C]
    (multi-label)."""

    def __init__(self, paths: Sequence[str], labels: list[int] | torch.Tensor):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} images but {len(labels)} labels")
        self.paths, self.labels = [str(p) for p in paths], labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return read_rgb(self.paths[index]), self.labels[index]

    def subset(self, indices: Sequence[int]) -> "ImageList":
        if isinstance(self.labels, torch.Tensor):
            return ImageList([self.paths[i] for i in indices], self.labels[list(indices)])
        return ImageList([self.paths[i] for i in indices], [self.labels[i] for i in indices])


class ArrayImages(Dataset):
    """Images held in memory as uint8 [N, H, W, 3] (CIFAR, the digits) with class-index labels."""

    def __init__(self, images: np.ndarray, labels: list[int]):
        if (
            images.dtype != np.uint8
            or images.ndim != 4
            or images.shape[3] != 3
            or len(images) != len(labels)
        ):
            raise ValueError(
                f"expected uint8 [N, H, W, 3] images with N labels, got {images.dtype} "
                f"{images.shape} "
                f"and {len(labels)} labels"
            )
        self.images, self.labels = images, [int(label) for label in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return torch.from_numpy(self.images[index].copy()).permute(
            2, 0, 1
        ).contiguous(), self.labels[index]

    def subset(self, indices: Sequence[int]) -> "ArrayImages":
        return ArrayImages(self.images[list(indices)], [self.labels[i] for i in indices])


Loaded = tuple[dict[str, Dataset], list[str]]  # {"train", "test"[, "val"]: dataset}, class names


# ------------------------------------------------------------------------------------------ readers


def _food101(root: Path) -> Loaded:
    splits = {split: Food101(root, split=split, download=False) for split in ("train", "test")}
    return _from_torchvision(splits, "_image_files", "_labels")


class _CifarPresence:
    """CIFAR as torchvision reads it, with its files checked for presence instead of their MD5
    sums."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all(
            (folder / name).is_file()
            for name, _ in self.train_list + self.test_list + [(self.meta["filename"], "")]
        )

    def _load_meta(self) -> None:
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def _cifar(root: Path, hundred: bool) -> Loaded:
    reader = type("Cifar", (_CifarPresence, CIFAR100 if hundred else CIFAR10), {})
    splits = {
        split: reader(root, train=split == "train", download=False) for split in ("train", "test")
    }
    return (
        {
            split: ArrayImages(np.ascontiguousarray(d.data), d.targets)
            for split, d in splits.items()
        },
        list(splits["train"].classes),
    )


def _birdsnap(root: Path) -> Loaded:
    """species.txt (tab-separated, header; id, common, scientific, dir) gives the classes in id
    order; test_images.txt (header 'path', then <dir>/<file> relative to images/) the test set;
    every other image under
    images/<dir>/ is train. Listed test images that were never fetched are left out, with a warning.
    """
    rows = [
        line.split("\t")
        for line in (root / "species.txt").read_text().splitlines()[1:]
        if line.strip()
    ]
    species = sorted((int(row[0]), row[1].strip(), row[3].strip()) for row in rows)
    classes, label_of = (
        [common for _, common, _ in species],
        {folder: i for i, (_, _, folder) in enumerate(species)},
    )
    listed = [
        line.strip()
        for line in (root / "test_images.txt").read_text().splitlines()[1:]
        if line.strip()
    ]
    unknown = sorted({path.split("/")[0] for path in listed} - set(label_of))
    if unknown:
        raise ValueError(
            f"test_images.txt names species folder '{unknown[0]}', which species.txt does not list"
        )
    images = root / "images"
    if not images.is_dir():
        raise FileNotFoundError(2, "No such directory", str(images))
    test = [path for path in listed if (images / path).is_file()]
    if len(test) < len(listed):
        log.warning(
            "birdsnap: %d of the %d test images listed in %s are not on disk (not fetched); "
            "testing on %d",
            len(listed) - len(test),
            len(listed),
            root / "test_images.txt",
            len(test),
        )
    test_set = set(listed)
    train = [
        f"{folder}/{file.name}"
        for folder in sorted(label_of)
        if (images / folder).is_dir()
        for file in sorted((images / folder).iterdir())
        if file.suffix.lower() in IMAGE_SUFFIXES and f"{folder}/{file.name}" not in test_set
    ]

    def split(paths: list[str]) -> ImageList:
        return ImageList(
            [str(images / p) for p in paths], [label_of[p.split("/")[0]] for p in paths]
        )

    return {"train": split(train), "test": split(test)}, classes


def _sun397(root: Path) -> Loaded:
    """torchvision's SUN397 finds the images and classes; the official partition 1 (Training_01.txt
    /
    Testing_01.txt, lines like /a/abbey/sun_xxx.jpg) splits them."""
    data = SUN397(root, download=False)
    folder = Path(data._data_dir)
    by_name = {
        "/" + path.relative_to(folder).as_posix(): (str(path), label)
        for path, label in zip(data._image_files, data._labels)
    }
    partitions = next(
        (
            d
            for d in (root, root / "Partitions")
            if (d / "Training_01.txt").is_file() and (d / "Testing_01.txt").is_file()
        ),
        None,
    )
    if partitions is None:
        raise FileNotFoundError(
            2,
            "No partition files Training_01.txt / Testing_01.txt",
            f"{root} or {root / 'Partitions'}",
        )
    splits = {}
    for split, listing in (("train", "Training_01.txt"), ("test", "Testing_01.txt")):
        names = (partitions / listing).read_text().split()
        missing = [name for name in names if name not in by_name]
        if missing:
            raise FileNotFoundError(
                2,
                f"{len(missing)} of the {len(names)} images {listing} lists are missing",
                str(folder) + missing[0],
            )
        splits[split] = ImageList([by_name[n][0] for n in names], [by_name[n][1] for n in names])
    return splits, list(data.classes)


def _cars(root: Path) -> Loaded:
    splits = {split: StanfordCars(root, split=split, download=False) for split in ("train", "test")}
    for d in splits.values():
        d._image_files, d._labels = (
            [path for path, _ in d._samples],
            [int(label) for _, label in d._samples],
        )
    return _from_torchvision(splits, "_image_files", "_labels")


def _aircraft(root: Path) -> Loaded:

    def read(split: str) -> FGVCAircraft:
        return FGVCAircraft(root, split=split, annotation_level="variant", download=False)

    splits = {split: read(split) for split in ("train", "test")}
    expected = root / "fgvc-aircraft-2013b" / "data" / "images_variant_val.txt"
    splits["val"] = _standard_val("aircraft", expected.is_file(), expected, lambda: read("val"))
    return _from_torchvision(splits, "_image_files", "_labels")


def _dtd(root: Path) -> Loaded:

    def read(split: str) -> DTD:
        return DTD(root, split=split, partition=1, download=False)

    splits = {split: read(split) for split in ("train", "test")}
    expected = root / "dtd" / "dtd" / "labels" / "val1.txt"
    splits["val"] = _standard_val("dtd", expected.is_file(), expected, lambda: read("val"))
    return _from_torchvision(splits, "_image_files", "_labels")


def _pets(root: Path) -> Loaded:
    splits = {
        split: OxfordIIITPet(root, split=split, target_types="category", download=False)
        for split in ("trainval", "test")
    }
    splits = {"train": splits["trainval"], "test": splits["test"]}
    return _from_torchvision(splits, "_images", "_labels")


def _caltech101(root: Path) -> Loaded:
    """Caltech-101's 102 categories as Kornblith et al. count them: the 101 object classes and
    BACKGROUND_Google (which torchvision's reader leaves out), in sorted folder order; 30 random
    images of each for training, the
    rest for test, drawn from the fixed seed 0 (3,060 / 6,084 on the full set)."""
    categories = root / "caltech101" / "101_ObjectCategories"
    if not categories.is_dir():
        raise RuntimeError("Dataset not found")
    classes = sorted(d.name for d in categories.iterdir() if d.is_dir())
    if "BACKGROUND_Google" not in classes:
        raise FileNotFoundError(2, "No BACKGROUND_Google folder (the 102nd class)", str(categories))
    files = [
        (str(path), label)
        for label, name in enumerate(classes)
        for path in sorted((categories / name).glob("image_*.jpg"))
    ]
    everything = ImageList([path for path, _ in files], [label for _, label in files])
    train, test = per_class_sample(everything.labels, CALTECH_TRAIN_PER_CLASS, FIXED_SPLIT_SEED)
    return {"train": everything.subset(train), "test": everything.subset(test)}, classes


class _FlowersPresence:
    """Flowers-102 as torchvision reads it, with imagelabels.mat and setid.mat checked for presence
    instead of
    their MD5 sums."""

    def _check_integrity(self) -> bool:
        return self._images_folder.is_dir() and all(
            (self._base_folder / self._file_dict[key][0]).is_file() for key in ("label", "setid")
        )


def _flowers102(root: Path) -> Loaded:
    from scipy.io import loadmat

    reader = type("Flowers", (_FlowersPresence, Flowers102), {})

    def read(split: str) -> Flowers102:
        return reader(root, split=split, download=False)

    splits = {split: read(split) for split in ("train", "test")}
    setid = root / "flowers-102" / "setid.mat"
    splits["val"] = _standard_val(
        "flowers102", "valid" in loadmat(setid), f"the 'valid' ids in {setid}", lambda: read("val")
    )
    return _from_torchvision(splits, "_image_files", "_labels")


def _voc2007(root: Path) -> Loaded:
    """VOC2007's train / val / test image sets, each image labelled per class from its XML objects:
    1 if a non-difficult instance is present, 0 if only difficult ones, -1 if none. Classes: VOC's
    20 in the standard order; a VOC-style set whose objects carry other names (transfer/scenes.py's)
    gets its names, sorted.
    transfer/scenes.py lists trainval and test only: that set needs train.txt and val.txt beside
    them."""
    voc = next(
        (
            d
            for d in (root / "VOCdevkit" / "VOC2007", root / "VOC2007", root)
            if (d / "ImageSets" / "Main").is_dir()
        ),
        None,
    )
    if voc is None:
        raise RuntimeError("Dataset not found")
    main = voc / "ImageSets" / "Main"
    if not (main / "test.txt").is_file():
        raise FileNotFoundError(2, "No such file", str(main / "test.txt"))
    if not ((main / "train.txt").is_file() and (main / "val.txt").is_file()):
        raise UserError(
            f"voc2007's validation split is missing: expected {main}/train.txt and val.txt (the "
            f"standard "
            "halves of trainval.txt)"
        )
    splits, objects = {}, {}
    for split in ("train", "val", "test"):
        ids = (main / f"{split}.txt").read_text().split()
        splits[split] = ids
        for name in ids:
            if name not in objects:
                tree = ElementTree.parse(voc / "Annotations" / f"{name}.xml").getroot()
                objects[name] = [
                    (o.findtext("name", "").strip(), o.findtext("difficult", "0").strip() == "1")
                    for o in tree.iter("object")
                ]
    names = {name for found in objects.values() for name, _ in found}
    classes = list(VOC_CLASSES) if names <= set(VOC_CLASSES) else sorted(names)
    index = {name: c for c, name in enumerate(classes)}
    datasets = {}
    for split, ids in splits.items():
        labels = np.full((len(ids), len(classes)), -1, dtype=np.int8)
        for row, name in enumerate(ids):
            for label, difficult in objects[name]:
                labels[row, index[label]] = max(labels[row, index[label]], 0 if difficult else 1)
        datasets[split] = ImageList(
            [str(voc / "JPEGImages" / f"{name}.jpg") for name in ids], torch.from_numpy(labels)
        )
    return datasets, classes


def _digits(root: Path) -> Loaded:
    """scikit-learn's 1,797 8x8 digits (values 0..16, scaled to 0..255, three channels); 30% of each
    class for
    test, drawn from the fixed seed 0."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    everything = ArrayImages(np.repeat(images[..., None], 3, axis=3), digits.target.tolist())
    rest, test = stratified_holdout(everything.labels, DIGITS_TEST_FRACTION, FIXED_SPLIT_SEED)
    return {"train": everything.subset(rest), "test": everything.subset(test)}, [
        str(d) for d in range(10)
    ]


READERS: dict[str, Callable[[Path], Loaded]] = {
    "food101": _food101,
    "cifar10": lambda root: _cifar(root, False),
    "cifar100": lambda root: _cifar(root, True),
    "birdsnap": _birdsnap,
    "sun397": _sun397,
    "cars": _cars,
    "aircraft": _aircraft,
    "voc2007": _voc2007,
    "dtd": _dtd,
    "pets": _pets,
    "caltech101": _caltech101,
    "flowers102": _flowers102,
    "digits": _digits,
}


def _from_torchvision(splits: dict, paths: str, labels: str) -> Loaded:
    """ImageLists of torchvision datasets' (private) file and label lists; the classes must agree
    across splits."""
    classes = {split: list(d.classes) for split, d in splits.items()}
    if any(names != classes["train"] for names in classes.values()):
        differing = next(split for split, names in classes.items() if names != classes["train"])
        raise ValueError(
            f"the {differing} split has {len(classes[differing])} classes, train "
            f"{len(classes['train'])}"
        )
    return (
        {
            split: ImageList(getattr(d, paths), [int(label) for label in getattr(d, labels)])
            for split, d in splits.items()
        },
        classes["train"],
    )


def _standard_val(name: str, present: bool, expected: Path | str, read: Callable):
    """The standard validation split by `read()`, or (not `present`) a UserError saying where it
    was expected."""
    if not present:
        raise UserError(f"{name}'s validation split is missing: expected {expected}")
    return read()


# ------------------------------------------------------------------------------------------ entry
# point


def _why(error: Exception) -> str:
    if isinstance(error, RuntimeError):
        return "not found"
    if isinstance(error, OSError) and error.filename:
        return f"{error.strerror or 'missing'}: {error.filename}"
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


def _check_files(name: str, root: Path, layout: str, splits: dict[str, Dataset]) -> None:
    for split, dataset in splits.items():
        if isinstance(dataset, ImageList):
            missing = [path for path in dataset.paths if not os.path.isfile(path)]
            if missing:
                raise UserError(
                    f"{name} under {root} is incomplete: {len(missing)} of the {len(dataset)} "
                    f"{split} "
                    f"images are missing, e.g. {missing[0]}; expected {layout}"
                )


def held_out(
    labels: list[int], test_labels: list[int], holdout: str, seed: int
) -> tuple[list[int], list[int]]:
    """(keep, held) indices of a training split by a hold-out rule of the table: "P%" of each class,
    "N/class"
    images of each class, or "test/class" (each class as many as the test split holds of it); drawn
    from `seed`."""

    if holdout.endswith("%"):
        return stratified_holdout(labels, float(holdout[:-1]) / 100, seed)
    count = holdout.split("/")[0]
    counts = Counter(test_labels) if count == "test" else {c: int(count) for c in set(labels)}
    return per_class_holdout(labels, dict(counts), seed)


def load_splits(
    name: str, root: str, seed: int = 0, val_fraction: float | None = None
) -> ClassifySplits:
    """The train / val / test splits of dataset `name` (a key of DATASETS) under `root`; val is the
    standard validation split where the dataset has one, else held out of train from `seed` by the
    dataset's published rule
    (DatasetInfo.holdout), or `val_fraction` of each class when given."""
    if name not in DATASETS:
        raise UserError(
            f"unknown classification dataset '{name}'; choose one of {', '.join(DATASETS)}"
        )
    info = DATASETS[name]
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise UserError(
            f"val_fraction {val_fraction} must be in (0, 1): the share of each training class held "
            f"out"
        )
    root_path = Path(root)
    if name != "digits" and not root_path.is_dir():
        raise UserError(f"{name}: data root {root} does not exist; expected {info.layout}")
    try:
        splits, classes = READERS[name](root_path)
    except (
        RuntimeError,
        OSError,
        KeyError,
        ValueError,
        IndexError,
        EOFError,
        pickle.UnpicklingError,
    ) as error:
        raise UserError(
            f"{name} under {root} is missing or incomplete ({_why(error)}); expected {info.layout}"
        ) from error
    _check_files(name, root_path, info.layout, splits)
    if info.standard_val:
        train, val, val_source = splits["train"], splits["val"], "standard"
    else:
        holdout = f"{100 * val_fraction:g}%" if val_fraction is not None else info.holdout
        keep, held = held_out(
            list(splits["train"].labels), list(splits["test"].labels), holdout, seed
        )
        train, val = splits["train"].subset(keep), splits["train"].subset(held)
        rule = (
            f"{holdout} of train held out per class"
            if holdout.endswith("%")
            else f"{holdout.split('/')[0]} images per class held out of train"
            if not holdout.startswith("test")
            else "as many images per class as the test split, held out of train"
        )
        val_source = f"{rule}, seed {seed}"
    return ClassifySplits(
        train, val, splits["test"], list(classes), info.metric, info.multilabel, val_source
    )
