"""Config schemas of the transfer tasks. Defaults are the small configs; full-size values live in configs/transfer/."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ClassificationData:
    dataset: str = "fashion_mnist"          # fashion_mnist | imagefolder (root/train, root/val)
    root: str = "/usr/share/datasets/fashion-mnist"
    train_split: str = "train"
    test_split: str = "test"
    image_size: int = 32
    resize_ratio: float = 1.0               # eval: resize short side to image_size * ratio, centre-crop
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    num_workers: int = 2
    limit_train: int = 0                    # 0 = all
    limit_test: int = 0


@dataclass
class LinearProtocol:
    epochs: int = 30
    batch_size: int = 512
    optimizer: str = "adam"                 # adam | sgd (SGD: momentum 0.9, cosine)
    lr: float = 1e-3                        # sgd: scaled by batch_size / 256
    weight_decay: float = 1e-5
    standardize: bool = True                # standardise features with train-set mean / std
    augment: bool = False                   # random crop + flip each epoch: recomputes features, no cache


@dataclass
class KnnProtocol:
    k: int = 20
    temperature: float = 0.07               # votes weighted by exp(cosine / T)


@dataclass
class ClassificationConfig:
    run_dir: str = "runs/linear"
    seed: int = 0
    data: ClassificationData = field(default_factory=ClassificationData)
    linear: LinearProtocol = field(default_factory=LinearProtocol)
    knn: KnnProtocol = field(default_factory=KnnProtocol)
    extract_batch_size: int = 256
    cache_dir: str = "~/.cache/ssl-hsic/features"
    device: Optional[str] = None
