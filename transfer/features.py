"""Frozen features of a backbone: extraction (sharded over processes), the on-disk cache that
linear, kNN and the other-dataset transfer read, and the datasets that feed them.

Features are extracted once per (backbone weights, dataset, split, transform) and cached as
memory-mapped .npy files under cache_dir, keyed by the sha256 of all of those. Under several
processes the extraction is sharded: rank r takes a contiguous run of whole batches, so every batch
holds the images it holds in a one-process run and the features are the same; the shards meet in
cache_dir (which all ranks must see: a shared filesystem on several nodes) and rank 0 joins them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from common.distributed import barrier, detect, rank0_decides
from common.errors import UserError
from common.seeds import derive_seed
from transfer.backbone import Backbone, fingerprint


def topk_accuracy(scores: Tensor, labels: Tensor, ks=(1, 5)) -> dict[str, float]:
    """Percentage of samples whose label is among the k highest scores, for each k."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(1).float().mean().item() for k in ks}


class Transformed(Dataset):
    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        if not isinstance(image, Tensor):  # a CorruptImage marker
            raise UserError(f"cannot read image {image.path}: {image.reason}")
        return self.transform(image), label


class SeededTransformed(Transformed):
    """A random transform drawn per image from (seed, epoch, index): the same views whichever
    process or
    loader worker reads the image."""

    def __init__(self, dataset: Dataset, transform, seed: int):
        super().__init__(dataset, transform)
        self.seed, self.epoch = seed, 0

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "task.views", self.epoch, index))
            return super().__getitem__(index)


def batch_shard(length: int, batch_size: int, rank: int, world: int) -> range:
    """The samples of rank r: whole batches floor(r nb / W) ... floor((r + 1) nb / W) - 1 of the nb
    = ceil(N / B)
    batches of a one-process pass, so the ranks' shards concatenate, in rank order, to the whole
    set."""
    batches = math.ceil(length / batch_size)
    return range(
        rank * batches // world * batch_size,
        min((rank + 1) * batches // world * batch_size, length),
    )


@torch.no_grad()
def extract(
    model: nn.Module, dataset: Dataset, batch_size: int, num_workers: int, device
) -> tuple[Tensor, Tensor]:
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    features, labels = [], []
    for images, targets in tqdm(
        loader, desc="features", disable=not sys.stderr.isatty(), leave=False
    ):
        features.append(model(images.to(device)).float().cpu())
        labels.append(targets)
    if not features:  # a rank whose shard is empty (fewer batches than processes)
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


class FeatureCache:
    """Memory-mapped feature files: cache_dir/<key>/{features,labels}.npy, written atomically."""

    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir).expanduser()

    @staticmethod
    def key(backbone: Backbone, description: dict) -> str:
        blob = json.dumps(
            {"weights": fingerprint(backbone.state_dict), **description},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def get(self, key: str) -> tuple[Tensor, Tensor] | None:
        folder = self.root / key
        if not (folder / "complete").exists():
            return None
        return (
            torch.from_numpy(np.load(folder / "features.npy", mmap_mode="r")),
            torch.from_numpy(np.load(folder / "labels.npy")),
        )

    @staticmethod
    def _save(folder: Path, prefix: str, features: Tensor, labels: Tensor) -> None:
        """folder/{prefix}features.npy and {prefix}labels.npy, each written to a temporary name of
        this process and renamed: two jobs extracting the same features at once (local jobs run side
        by side) each rename a whole
        file."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in (("features", features.numpy()), ("labels", labels.numpy())):
            tmp = folder / f".{prefix}{name}.{os.getpid()}.tmp.npy"
            np.save(tmp, array)
            tmp.replace(folder / f"{prefix}{name}.npy")

    def put(self, key: str, features: Tensor, labels: Tensor, description: dict) -> None:
        folder = self.root / key
        self._save(folder, "", features, labels)
        (folder / "description.json").write_text(json.dumps(description, indent=2, default=str))
        (folder / "complete").touch()

    def put_part(self, key: str, rank: int, features: Tensor, labels: Tensor) -> None:
        """One rank's shard, beside the entry it will join."""
        self._save(self.root / key / "parts", f"{rank}.", features, labels)

    def join_parts(self, key: str, world: int, description: dict) -> None:
        """Concatenate the shards of ranks 0 ... world-1 into the entry (rank 0), then drop them."""
        folder = self.root / key / "parts"
        missing = [r for r in range(world) if not (folder / f"{r}.features.npy").exists()]
        if missing:
            raise UserError(
                f"the feature shards of ranks {missing} are not in {folder}: cache_dir must be one "
                f"folder "
                "that every process sees (a shared filesystem when the job spans "
                f"nodes)"
            )
        parts = [
            [np.load(folder / f"{r}.{name}.npy", mmap_mode="r") for r in range(world)]
            for name in ("features", "labels")
        ]
        joined = [
            torch.cat([torch.from_numpy(np.asarray(part)) for part in shards if len(part)])
            for shards in parts
        ]
        self.put(key, *joined, description)
        shutil.rmtree(folder, ignore_errors=True)


def cached_features(
    backbone: Backbone,
    model: nn.Module,
    dataset: Dataset,
    description: dict,
    cache: FeatureCache,
    batch_size: int,
    num_workers: int,
    device,
    key: str | None = None,
) -> tuple[Tensor, Tensor, bool]:
    """(features, labels, came_from_cache), extracted sharded over the processes when there are
    several."""
    key = key or FeatureCache.key(backbone, description)
    if rank0_decides(cache.get(key) is not None):
        return *cache.get(key), True
    processes = detect()
    if not processes.is_distributed:
        features, labels = extract(model, dataset, batch_size, num_workers, device)
        cache.put(key, features, labels, description)
        return features, labels, False
    shard = batch_shard(len(dataset), batch_size, processes.rank, processes.world_size)
    cache.put_part(
        key,
        processes.rank,
        *extract(model, Subset(dataset, shard), batch_size, num_workers, device),
    )
    barrier()
    if processes.rank == 0:
        cache.join_parts(key, processes.world_size, description)
    barrier()
    joined = cache.get(key)
    if joined is None:
        raise UserError(
            f"rank {processes.rank} cannot read the joined features in {cache.root / key}: "
            f"cache_dir must "
            "be one folder that every process sees (a shared filesystem when the job "
            "spans nodes)"
        )
    return *joined, False


# -------------------------------------------------------------------------------------- classifier
