"""Linear and kNN evaluation of a frozen backbone.

Features are extracted once per (backbone weights, dataset, split, transform) and cached as memory-mapped
.npy files under cache_dir, keyed by the sha256 of all of those; the linear classifier then trains on the
cached features in seconds. The standard protocol with augmentation (linear.augment=true: random resized
crop + flip every epoch) recomputes the features each epoch and does not cache.

kNN (Wu et al. 2018, as in DINO): cosine similarity to the k nearest training features, each neighbour
voting for its class with weight exp(sim / T).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from pretrain.errors import UserError
from pretrain.io import atomic_torch_save
from transfer.backbone import Backbone, fingerprint

log = logging.getLogger("transfer")


# ----------------------------------------------------------------------------------------- metrics

def topk_accuracy(scores: Tensor, labels: Tensor, ks=(1, 5)) -> dict[str, float]:
    """Percentage of samples whose label is among the k highest scores, for each k."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(1).float().mean().item() for k in ks}


def knn_scores(train: Tensor, train_labels: Tensor, test: Tensor, num_classes: int, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """Class scores [N_test, C]: sum over the k most cosine-similar training samples of exp(sim / T)."""
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    k = min(k, train.shape[0])
    out = torch.zeros(test.shape[0], num_classes)
    for start in range(0, test.shape[0], chunk):
        sims, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        out[start:start + chunk].scatter_add_(1, train_labels[idx], (sims / temperature).exp())
    return out


# ---------------------------------------------------------------------------------------- features

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


@torch.no_grad()
def extract(model: nn.Module, dataset: Dataset, batch_size: int, num_workers: int, device) -> tuple[Tensor, Tensor]:
    from tqdm import tqdm
    import sys
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    features, labels = [], []
    for images, targets in tqdm(loader, desc="features", disable=not sys.stderr.isatty(), leave=False):
        features.append(model(images.to(device)).float().cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


class FeatureCache:
    """Memory-mapped feature files: cache_dir/<key>/{features,labels}.npy, written atomically."""

    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir).expanduser()

    @staticmethod
    def key(backbone: Backbone, description: dict) -> str:
        blob = json.dumps({"weights": fingerprint(backbone.state_dict), **description}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def get(self, key: str) -> tuple[Tensor, Tensor] | None:
        folder = self.root / key
        if not (folder / "complete").exists():
            return None
        return (torch.from_numpy(np.load(folder / "features.npy", mmap_mode="r")),
                torch.from_numpy(np.load(folder / "labels.npy")))

    def put(self, key: str, features: Tensor, labels: Tensor, description: dict) -> None:
        folder = self.root / key
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in (("features", features.numpy()), ("labels", labels.numpy())):
            tmp = folder / f".{name}.tmp.npy"
            np.save(tmp, array)
            tmp.replace(folder / f"{name}.npy")
        (folder / "description.json").write_text(json.dumps(description, indent=2, default=str))
        (folder / "complete").touch()


def cached_features(backbone: Backbone, model: nn.Module, dataset: Dataset, description: dict, cache: FeatureCache,
                    batch_size: int, num_workers: int, device) -> tuple[Tensor, Tensor, bool]:
    """(features, labels, came_from_cache)."""
    key = FeatureCache.key(backbone, description)
    hit = cache.get(key)
    if hit is not None:
        return *hit, True
    features, labels = extract(model, dataset, batch_size, num_workers, device)
    cache.put(key, features, labels, description)
    return features, labels, False


# -------------------------------------------------------------------------------------- classifier

def train_linear(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, protocol,
                 seed: int, device, checkpoint: Path | None = None, feature_fn=None) -> dict[str, float]:
    """Train a linear layer on features and return test top-1 / top-5.

    `feature_fn(epoch)`, when given, recomputes the training features each epoch (the augmented protocol).
    With `checkpoint`, the classifier state is saved after each epoch and a rerun resumes from it.
    """
    torch.manual_seed(seed)
    mean, std = (train_x.float().mean(0), train_x.float().std(0) + 1e-6) if protocol.standardize else (0.0, 1.0)
    head = nn.Linear(train_x.shape[1], num_classes).to(device)
    steps_per_epoch = math.ceil(len(train_y) / protocol.batch_size)
    total = protocol.epochs * steps_per_epoch
    if protocol.optimizer == "sgd":
        optimizer = torch.optim.SGD(head.parameters(), lr=protocol.lr * protocol.batch_size / 256, momentum=0.9,
                                    weight_decay=protocol.weight_decay)
    elif protocol.optimizer == "adam":
        optimizer = torch.optim.Adam(head.parameters(), lr=protocol.lr, weight_decay=protocol.weight_decay)
    else:
        raise UserError(f"unknown linear.optimizer '{protocol.optimizer}'; choose adam or sgd")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    start = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = state["epoch"]
        log.info("linear: resuming at epoch %d of %d", start, protocol.epochs)
    for epoch in range(start, protocol.epochs):
        x = feature_fn(epoch) if feature_fn else train_x
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for batch in order.split(protocol.batch_size):
            inputs = ((x[batch].float() - mean) / std).to(device)
            loss = F.cross_entropy(head(inputs), train_y[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if checkpoint is not None:
            atomic_torch_save({"head": head.state_dict(), "optimizer": optimizer.state_dict(),
                               "schedule": schedule.state_dict(), "epoch": epoch + 1}, checkpoint)
    with torch.no_grad():
        scores = torch.cat([head(((chunk.float() - mean) / std).to(device)).cpu() for chunk in test_x.split(4096)])
    return topk_accuracy(scores, test_y)
