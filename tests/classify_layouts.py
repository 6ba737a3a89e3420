"""Tiny copies of the linear-transfer datasets in their real on-disk layouts, for
tests/test_classify_datasets.py.

Each writer fills a root with a few small images per class in the layout that torchvision (or this
project's reader) expects, and returns what `load_splits` should then find: the class names, the
split sizes ('train' is the whole training split before a validation share is held out of it, unless
'val' is given) and the image size. Every image is a flat colour whose red channel is
`shade(label)`, so a test can check each item's label against its pixels; the green channel counts
the images, so no two images of a split are the same."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets import Flowers102

from transfer.classify_datasets import VOC_CLASSES

WIDTH, HEIGHT = 7, 5
_counter = iter(range(10**9))


def shade(label: int) -> int:
    return 40 + 60 * label


def image(path: Path, label: int, gray: bool = False) -> str:
    """A WIDTH x HEIGHT image at `path` (format from the suffix) whose red channel is
    shade(label)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if gray:
        Image.new("L", (WIDTH, HEIGHT), shade(label)).save(path)
    else:
        Image.new("RGB", (WIDTH, HEIGHT), (shade(label), next(_counter) % 256, 90)).save(
            path, quality=95
        )
    return str(path)


def expected(classes, train, test, val=None, size=(HEIGHT, WIDTH)) -> dict:
    return {"classes": list(classes), "train": train, "val": val, "test": test, "size": size}


def food101(root: Path) -> dict:
    classes = ["apple_pie", "baby_back_ribs", "baklava"]
    meta = {"train": {}, "test": {}}
    for label, name in enumerate(classes):
        for i in range(7):
            image(root / "food-101" / "images" / name / f"{1000 + i}.jpg", label)
            meta["train" if i < 5 else "test"].setdefault(name, []).append(f"{name}/{1000 + i}")
    for split, listing in meta.items():
        (root / "food-101" / "meta").mkdir(parents=True, exist_ok=True)
        (root / "food-101" / "meta" / f"{split}.json").write_text(json.dumps(listing))
    (root / "food-101" / "meta" / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    return expected(classes, 15, 6)


def _cifar_rows(labels: list[int]) -> np.ndarray:
    """uint8 [N, 3072], CIFAR's row format (the red, green, blue 32 x 32 planes)."""
    rows = np.zeros((len(labels), 3, 32 * 32), dtype=np.uint8)
    for row, label in enumerate(labels):
        rows[row, 0], rows[row, 1], rows[row, 2] = shade(label), next(_counter) % 256, 90
    return rows.reshape(len(labels), 3072)


def _pickle(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(entry, protocol=2))


CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def cifar10(root: Path) -> dict:
    folder = root / "cifar-10-batches-py"
    for batch in range(1, 6):  # 5 images of classes 0, 1, 2 spread over the five training batches
        labels = [0, 1, 2]
        _pickle(
            folder / f"data_batch_{batch}",
            {
                "batch_label": f"training batch {batch} of 5",
                "labels": labels,
                "data": _cifar_rows(labels),
                "filenames": [f"{batch}_{i}.png" for i in labels],
            },
        )
    labels = [0, 0, 1, 1, 2, 2]
    _pickle(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": labels,
            "data": _cifar_rows(labels),
            "filenames": [f"t{i}.png" for i in range(6)],
        },
    )
    _pickle(
        folder / "batches.meta",
        {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 3, "num_vis": 3072},
    )
    return expected(CIFAR10_CLASSES, 15, 6, size=(32, 32))


CIFAR100_CLASSES = [f"fine_{i:02d}" for i in range(100)]


def cifar100(root: Path) -> dict:
    folder = root / "cifar-100-python"
    for split, labels in (("train", [0, 1, 2] * 5), ("test", [0, 1, 2] * 2)):
        _pickle(
            folder / split,
            {
                "batch_label": split,
                "fine_labels": labels,
                "coarse_labels": [0] * len(labels),
                "data": _cifar_rows(labels),
                "filenames": [f"{i}.png" for i in range(len(labels))],
            },
        )
    _pickle(
        folder / "meta",
        {
            "fine_label_names": CIFAR100_CLASSES,
            "coarse_label_names": [f"coarse_{i}" for i in range(20)],
        },
    )
    return expected(CIFAR100_CLASSES, 15, 6, size=(32, 32))


BIRDS = [
    (1, "Acadian Flycatcher", "Empidonax virescens", "Acadian_Flycatcher"),
    (2, "Acorn Woodpecker", "Melanerpes formicivorus", "Acorn_Woodpecker"),
    (3, "Alder Flycatcher", "Empidonax alnorum", "Alder_Flycatcher"),
]


def birdsnap(root: Path) -> dict:
    """The official release after get_birdsnap.py: 7 images of each species, 2 of them test, plus
    one listed test
    image that was never fetched."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "species.txt").write_text(
        "id\tcommon\tscientific\tdir\n" + "".join("\t".join(map(str, s)) + "\n" for s in BIRDS)
    )
    paths, tests = [], []
    for label, (_, _, _, folder) in enumerate(BIRDS):
        for i in range(7):
            path = f"{folder}/{label * 100 + i}.jpg"
            image(root / "images" / path, label)
            paths.append((path, label + 1))
            if i >= 5:
                tests.append(path)
    tests.append(f"{BIRDS[0][3]}/999.jpg")  # listed, not on disk
    (root / "test_images.txt").write_text("path\n" + "".join(f"{p}\n" for p in tests))
    (root / "images.txt").write_text(
        "url\tmd5\tpath\tspecies_id\tbb_x1\tbb_y1\tbb_x2\tbb_y2\n"
        + "".join(
            f"http://example.invalid/{i}.jpg\t0\t{p}\t{s}\t0\t0\t6\t4\n"
            for i, (p, s) in enumerate(paths)
        )
    )
    return expected([common for _, common, _, _ in BIRDS], 15, 6)


SUN_CLASSES = ["/a/abbey", "/b/bakery/shop", "/c/canyon"]


def sun397(root: Path) -> dict:
    """SUN397/ with 8 images per class, partition 1 listing 5 for training and 2 for test (one image
    unused, as in
    the real partitions), the partition files in root/Partitions."""
    folder = root / "SUN397"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ClassName.txt").write_text("".join(f"{c}\n" for c in SUN_CLASSES))
    listings = {"Training_01.txt": [], "Testing_01.txt": []}
    for label, name in enumerate(SUN_CLASSES):
        for i in range(8):
            file = f"sun_{'abc'[label]}{i:04d}.jpg"
            image(folder / name.lstrip("/") / file, label)
            if i < 7:
                listings["Training_01.txt" if i < 5 else "Testing_01.txt"].append(f"{name}/{file}")
    (root / "Partitions").mkdir()
    for listing, lines in listings.items():
        (root / "Partitions" / listing).write_text("".join(f"{line}\n" for line in lines))
    return expected([c[3:] for c in SUN_CLASSES], 15, 6)


CARS = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]


def _annotations(rows: list[tuple[int, str]]) -> dict:
    """Stanford Cars' annotation struct array: bbox_x1, bbox_y1, bbox_x2, bbox_y2, class
    (1-based), fname."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    table = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, (label, fname) in enumerate(rows):
        table[0, i] = (1, 1, WIDTH, HEIGHT, label + 1, fname)
    return {"annotations": table}


def cars(root: Path) -> dict:
    from scipy.io import savemat

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([CARS], dtype=object)})
    for split, per_class, mat in (
        ("train", 5, base / "devkit" / "cars_train_annos.mat"),
        ("test", 2, base / "cars_test_annos_withlabels.mat"),
    ):
        rows = [
            (label, f"{label * 10 + i + 1:05d}.jpg") for label in range(3) for i in range(per_class)
        ]
        for label, fname in rows:
            image(base / f"cars_{split}" / fname, label)
        savemat(mat, _annotations(rows))
    return expected(CARS, 15, 6)


AIRCRAFT = ["707-320", "A300B4", "F-16A/B"]


def aircraft(root: Path) -> dict:
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("".join(f"{v}\n" for v in AIRCRAFT))
    number = 1000000
    for split, per_class in (("train", 3), ("val", 2), ("test", 2)):
        lines = []
        for label, variant in enumerate(AIRCRAFT):
            for _ in range(per_class):
                number += 1
                image(data / "images" / f"{number}.jpg", label)
                lines.append(f"{number} {variant}\n")
        (data / f"images_variant_{split}.txt").write_text("".join(lines))
    return expected(AIRCRAFT, 9, 6, val=6)


# VOC2007: image id -> objects (class, difficult); the labels load_splits must derive (1 / 0 / -1
# per class).
VOC_IMAGES = {
    "train": {
        "000005": [("chair", 0), ("chair", 1)],
        "000007": [("car", 0)],
        "000009": [("horse", 0), ("person", 1)],
        "000012": [("car", 1)],
    },
    "val": {
        "000017": [("person", 0), ("horse", 0)],
        "000019": [("cat", 1), ("cat", 1)],
        "000021": [("dog", 0)],
    },
    "test": {
        "000001": [("dog", 0), ("person", 0)],
        "000002": [("train", 0)],
        "000004": [("car", 1), ("car", 0)],
    },
}


def voc_labels(split: str) -> np.ndarray:
    labels = np.full((len(VOC_IMAGES[split]), 20), -1, dtype=np.int8)
    for row, found in enumerate(VOC_IMAGES[split].values()):
        for name, difficult in found:
            c = VOC_CLASSES.index(name)
            labels[row, c] = max(labels[row, c], 0 if difficult else 1)
    return labels


def voc_xml(name: str, objects: list[tuple[str, int]]) -> str:
    boxes = "".join(
        f"<object><name>{c}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}"
        f"</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>{WIDTH}</xmax><ymax>{HEIGHT}</ymax></bndbox>"
        "</object>"
        for c, d in objects
    )
    return (
        f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename><source><database>The "
        f"VOC2007 "
        f"Database</database></source><size><width>{WIDTH}</width><height>{HEIGHT}</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{boxes}</annotation>\n"
    )


def voc2007(root: Path) -> dict:
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for split, images in VOC_IMAGES.items():
        for name, objects in images.items():
            image(voc / "JPEGImages" / f"{name}.jpg", 0)
            (voc / "Annotations" / f"{name}.xml").write_text(voc_xml(name, objects))
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in images))
    trainval = sorted([*VOC_IMAGES["train"], *VOC_IMAGES["val"]])
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{n}\n" for n in trainval))
    return expected(VOC_CLASSES, 4, 3, val=3)


DTD_CLASSES = ["banded", "blotchy", "braided"]


def dtd(root: Path) -> dict:
    data = root / "dtd" / "dtd"
    (data / "labels").mkdir(parents=True)
    for split, start in (("train", 1), ("val", 3), ("test", 5)):
        lines = []
        for label, name in enumerate(DTD_CLASSES):
            for i in range(start, start + 2):
                image(data / "images" / name / f"{name}_{i:04d}.jpg", label)
                lines.append(f"{name}/{name}_{i:04d}.jpg\n")
        (data / "labels" / f"{split}1.txt").write_text("".join(lines))
    return expected(DTD_CLASSES, 6, 6, val=6)


# breed, species (1 cat, 2 dog)
PETS = [("Abyssinian", 1), ("american_bulldog", 2), ("american_pit_bull_terrier", 2)]


def pets(root: Path) -> dict:
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    listings = {"trainval": [], "test": []}
    for label, (breed, species) in enumerate(PETS):
        for i in range(1, 8):
            image(base / "images" / f"{breed}_{i}.jpg", label)
            listings["trainval" if i <= 5 else "test"].append(
                f"{breed}_{i} {label + 1} {species} {label + 1}\n"
            )
    for split, lines in listings.items():
        (base / "annotations" / f"{split}.txt").write_text("".join(lines))
    return expected(["Abyssinian", "American Bulldog", "American Pit Bull Terrier"], 15, 6)


# images per class (sorted)
CALTECH = {"BACKGROUND_Google": 33, "accordion": 32, "airplanes": 34, "anchor": 31}


def caltech101(root: Path) -> dict:
    folder = root / "caltech101" / "101_ObjectCategories"
    for label, (name, count) in enumerate(CALTECH.items()):
        for i in range(1, count + 1):
            # one grayscale image
            image(folder / name / f"image_{i:04d}.jpg", label, gray=(label, i) == (1, 1))
    return expected(list(CALTECH), 30 * len(CALTECH), sum(CALTECH.values()) - 30 * len(CALTECH))


def flowers102(root: Path) -> dict:
    from scipy.io import savemat

    base = root / "flowers-102"
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    for label in range(3):
        for key, count in (("trnid", 2), ("valid", 2), ("tstid", 3)):
            for _ in range(count):
                labels.append(label + 1)
                ids[key].append(len(labels))
                image(base / "jpg" / f"image_{len(labels):05d}.jpg", label)
    savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(
        base / "setid.mat", {key: np.array([value], dtype=np.uint16) for key, value in ids.items()}
    )
    return expected(Flowers102.classes, 6, 9, val=6)


def digits(root: Path) -> dict:
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target)
    test = int(sum(min(n - 1, max(1, round(0.3 * n))) for n in counts))
    return expected([str(d) for d in range(10)], 1797 - test, test, size=(8, 8))


WRITERS = {
    "food101": food101,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "birdsnap": birdsnap,
    "sun397": sun397,
    "cars": cars,
    "aircraft": aircraft,
    "voc2007": voc2007,
    "dtd": dtd,
    "pets": pets,
    "caltech101": caltech101,
    "flowers102": flowers102,
    "digits": digits,
}
