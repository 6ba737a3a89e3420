"""Datasets for pretraining: Fashion-MNIST from Debian's dataset-fashion-mnist files, and
ImageFolder trees (ImageNet-style). Items are uint8 image tensors [3, H, W] with integer labels.

A corrupt image does not raise inside a DataLoader worker (where the error would come back wrapped
in a traceback); the dataset returns a `CorruptImage` marker and the training loop decides: a clear
error naming the file, or a counted skip (data.on_corrupt)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image

from common.errors import UserError
from common.seeds import derive_seed

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass(frozen=True)
class CorruptImage:
    path: str
    reason: str


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip'd or not): magic 0x0000 | dtype 0x08 (uint8) | ndim, then
    big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(
            f"{path} is not a uint8 IDX file (bad magic number); re-install {FASHION_MNIST_PACKAGE}"
        )
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(
            f"{path} is truncated: {body.size} bytes of {int(np.prod(dims))}; re-install "
            f"{FASHION_MNIST_PACKAGE}"
        )
    return body.reshape(*dims)


class FashionMNIST(Dataset):
    """Fashion-MNIST (60k train / 10k test, 28x28 gray), as 3-channel uint8 tensors."""

    def __init__(self, root: str | Path, split: str = "train", limit: int = 0):
        root = Path(root)
        if split not in FASHION_MNIST_FILES:
            raise UserError(f"Fashion-MNIST has splits {list(FASHION_MNIST_FILES)}, not '{split}'")
        images_file, labels_file = (root / name for name in FASHION_MNIST_FILES[split])
        if not images_file.is_file() or not labels_file.is_file():
            raise UserError(
                f"Fashion-MNIST not found in {root} (no {images_file.name}); install the Debian "
                f"package {FASHION_MNIST_PACKAGE} (apt-get install "
                f"{FASHION_MNIST_PACKAGE}) or set "
                "data.root to a folder with the four idx .gz files"
            )
        self.images = torch.from_numpy(read_idx(images_file).copy())
        self.labels = torch.from_numpy(read_idx(labels_file).astype(np.int64))
        if limit:
            self.images, self.labels = self.images[:limit], self.labels[:limit]
        self.classes = FASHION_MNIST_CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].expand(3, -1, -1), int(self.labels[index])


class ImageFolder(Dataset):
    """root/<class>/<image>: the ImageNet layout. Unreadable files come back as CorruptImage
    markers."""

    def __init__(self, root: str | Path, limit: int = 0):
        root = Path(root)
        if not root.is_dir():
            raise UserError(
                f"image folder {root} does not exist; set data.root to a folder of class "
                f"sub-folders"
            )
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.samples = [
            (str(path), label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if limit:
            self.samples = self.samples[:limit]
        if not self.samples:
            raise UserError(
                f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)}) in class "
                "sub-folders; expected root/<class>/<image>"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            return decode_image(path, mode=ImageReadMode.RGB), label
        except Exception as error:  # truncated, not an image, unreadable
            return CorruptImage(path, " ".join(str(error).split())[:200]), label


def build_dataset(name: str, root: str, split: str = "train", limit: int = 0) -> Dataset:
    if name == "fashion_mnist":
        return FashionMNIST(root, split, limit)
    if name == "imagefolder":
        return ImageFolder(Path(root) / split if split else root, limit)
    raise UserError(f"unknown dataset '{name}'; choose fashion_mnist or imagefolder (data.dataset)")


class Augmented(Dataset):
    """Applies `transform` to dataset[index] with randomness fixed by (seed, epoch, index).

    The sampler hands out (index, epoch) pairs. Seeding each item makes the views independent of
    worker count and order, so a resumed run sees exactly the views the uninterrupted run would have
    seen."""

    def __init__(self, dataset: Dataset, transform: Callable, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, epoch = item
        image, label = self.dataset[index]
        if isinstance(image, CorruptImage):
            return image
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "pretrain.views", epoch, index))
            return self.transform(image), label


class EpochBatchSampler(Sampler):
    """Deterministic global batches: epoch e shuffles with seed (seed, e); global batch b is
    perm[b*B:(b+1)*B], of which rank r takes the r-th contiguous slice. Starting at `start_batch`
    resumes
    mid-epoch. Incomplete batches are dropped."""

    def __init__(
        self,
        size: int,
        global_batch: int,
        seed: int,
        epoch: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if global_batch % world_size:
            raise UserError(
                f"batch size {global_batch} is not divisible by the {world_size} processes"
            )
        self.size, self.global_batch, self.seed, self.epoch = size, global_batch, seed, epoch
        self.start_batch, self.rank, self.local_batch = (
            start_batch,
            rank,
            global_batch // world_size,
        )

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.global_batch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(
            self.size,
            generator=torch.Generator().manual_seed(
                derive_seed(self.seed, "pretrain.order", self.epoch)
            ),
        )
        for b in range(self.start_batch, self.batches_per_epoch):
            first = b * self.global_batch + self.rank * self.local_batch
            yield [(int(i), self.epoch) for i in order[first : first + self.local_batch]]


def collate_views(items: list) -> dict:
    """Stack the two views; keep corrupt-image markers aside for the loop to report or count."""
    corrupt = [item for item in items if isinstance(item, CorruptImage)]
    good = [item for item in items if not isinstance(item, CorruptImage)]
    if not good:
        return {"view1": None, "view2": None, "labels": None, "corrupt": corrupt}
    (views, labels) = zip(*good)
    return {
        "view1": torch.stack([v[0] for v in views]),
        "view2": torch.stack([v[1] for v in views]),
        "labels": torch.tensor(labels),
        "corrupt": corrupt,
    }
