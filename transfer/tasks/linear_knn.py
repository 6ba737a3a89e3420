"""The linear and kNN tasks: classification on the frozen backbone's features (transfer/features.py:
extracted once, cached, sharded over processes).

The linear classifier trains on the cached features in seconds. The standard protocol with
augmentation
(linear.augment=true: random resized crop + flip every epoch, drawn per image from (seed, epoch, index))
recomputes the features each epoch and does not cache. Under several processes every rank trains the
same classifier on the joined features (seeded, so identically; rank 0 writes the results).

kNN (Wu et al. 2018, as in DINO): cosine similarity to the k nearest training features, each
neighbour voting for its class with weight exp(sim / T)."""

from __future__ import annotations

import copy
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from common.checks import (
    NON_NEGATIVE,
    POSITIVE_INT,
    at_least,
    between,
    checked,
    each,
    greater_than,
    one_of,
)
from common.distributed import init_distributed
from common.errors import UserError
from common.rundir import Progress, pick_device
from common.schedule import cosine_schedule
from common.seeds import derive_seed
from pretrain.augment import InceptionCrop, eval_transform
from pretrain.data import build_dataset
from pretrain.ema import debiased_ema_update_
from transfer.backbone import Backbone
from transfer.features import (
    FeatureCache,
    SeededTransformed,
    Transformed,
    cached_features,
    topk_accuracy,
)
from transfer.runner import TaskResult
from transfer.tasks.contract import TaskConfig

log = logging.getLogger("transfer")


# ------------------------------------------------------------------------------------------ config


@dataclass
class ClassificationData:
    # imagefolder: root/train, root/val
    dataset: str = checked("fashion_mnist", one_of("fashion_mnist", "imagefolder"))
    root: str = "/usr/share/datasets/fashion-mnist"
    train_split: str = "train"
    test_split: str = "test"
    image_size: int = checked(32, at_least(8))
    # eval: resize short side to image_size * ratio, centre-crop
    resize_ratio: float = checked(1.0, at_least(1.0))
    mean: tuple[float, float, float] = checked((0.5, 0.5, 0.5), each(between(0, 1), 3))
    std: tuple[float, float, float] = checked((0.25, 0.25, 0.25), each(greater_than(0), 3))
    num_workers: int = checked(2, NON_NEGATIVE)
    limit_train: int = checked(0, NON_NEGATIVE)  # 0 = all
    limit_test: int = checked(0, NON_NEGATIVE)


@dataclass
class LinearProtocol:
    epochs: int = checked(30, POSITIVE_INT)
    batch_size: int = checked(512, POSITIVE_INT)
    optimizer: str = checked("adam", one_of("adam", "sgd"))  # SGD: momentum 0.9, cosine
    # sgd: scaled by batch_size / 256
    lr: float = checked(1e-3, greater_than(0))
    nesterov: bool = False  # sgd: Nesterov momentum (BYOL's variant)
    warmup_steps: int = checked(0, NON_NEGATIVE)  # linear warmup from 0, then cosine to 0
    # > 0: score the zero-debiased EMA of the classifier
    ema: float = checked(0.0, between(0, 1, open_high=True))
    # choose lr among these on `heldout` training images
    lr_grid: tuple = checked((), each(greater_than(0), empty=True))
    # images held out of training to choose lr (BYOL: 10,009)
    heldout: int = checked(0, NON_NEGATIVE)
    weight_decay: float = checked(1e-5, NON_NEGATIVE)
    standardize: bool = True  # standardise features with train-set mean / std
    # random crop + flip each epoch: recomputes features, no cache
    augment: bool = False


@dataclass
class KnnProtocol:
    k: int = checked(20, POSITIVE_INT)
    # votes weighted by exp(cosine / T)
    temperature: float = checked(0.07, greater_than(0))


@dataclass
class Config(TaskConfig):
    run_dir: str = "runs/linear"
    data: ClassificationData = field(default_factory=ClassificationData)
    linear: LinearProtocol = field(default_factory=LinearProtocol)
    knn: KnnProtocol = field(default_factory=KnnProtocol)
    extract_batch_size: int = checked(256, POSITIVE_INT)
    cache_dir: str = "~/.cache/ssl-hsic/features"


EXAMPLES = """\
examples:
  python -m transfer linear --backbone runs/fm/checkpoints/last.pt --config configs/transfer/linear_fashion_mnist.yaml
  python -m transfer knn --backbone random:resnet18 --config configs/transfer/linear_fashion_mnist.yaml \\
      run_dir=runs/knn0
Keys and defaults: transfer/tasks/linear_knn.py (Config)."""


# ----------------------------------------------------------------------------------------- metrics


def knn_scores(
    train: Tensor,
    train_labels: Tensor,
    test: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Class scores [N_test, C]: sum over the k most cosine-similar training samples of exp(sim /
    T)."""
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    k = min(k, train.shape[0])
    out = torch.zeros(test.shape[0], num_classes)
    for start in range(0, test.shape[0], chunk):
        sims, idx = (test[start : start + chunk] @ train.T).topk(k, dim=1)
        out[start : start + chunk].scatter_add_(1, train_labels[idx], (sims / temperature).exp())
    return out


def train_linear(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    protocol,
    seed: int,
    device,
    checkpoint: Path | None = None,
    feature_fn=None,
    save: bool = True,
    lr: float | None = None,
) -> dict[str, float]:
    """Train a linear layer on features and return test top-1 / top-5.

    SGD (momentum 0.9, Nesterov when asked, lr x batch / 256) or Adam, `warmup_steps` of linear
    warmup then a cosine decay to 0; with `ema` > 0 the zero-debiased EMA of the classifier is what
    is scored (the official ssl_hsic eval scores its 0.999 EMA). `feature_fn(epoch)`, when given,
    recomputes the training features each epoch (the augmented protocol). With `checkpoint`, the
    state is saved after each epoch (when `save`: rank 0) and a rerun resumes from it. `lr`
    overrides protocol.lr."""

    torch.manual_seed(derive_seed(seed, "task.init"))
    mean, std = (
        (train_x.float().mean(0), train_x.float().std(0) + 1e-6)
        if protocol.standardize
        else (0.0, 1.0)
    )
    head = nn.Linear(train_x.shape[1], num_classes).to(device)
    average = copy.deepcopy(head).requires_grad_(False)
    steps_per_epoch = math.ceil(len(train_y) / protocol.batch_size)
    total = protocol.epochs * steps_per_epoch
    lr = protocol.lr if lr is None else lr
    if protocol.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            head.parameters(),
            lr=lr * protocol.batch_size / 256,
            momentum=0.9,
            nesterov=protocol.nesterov,
            weight_decay=protocol.weight_decay,
        )
    else:
        optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=protocol.weight_decay)
    schedule = cosine_schedule(optimizer, total, protocol.warmup_steps)
    progress = (
        Progress(
            checkpoint, "epoch", head=head, average=average, optimizer=optimizer, schedule=schedule
        )
        if checkpoint
        else None
    )
    start = progress.restore() if progress else 0
    if start:
        log.info("linear: resuming at epoch %d of %d", start, protocol.epochs)
    for epoch in range(start, protocol.epochs):
        x = feature_fn(epoch) if feature_fn else train_x
        order = torch.randperm(
            len(train_y),
            generator=torch.Generator().manual_seed(derive_seed(seed, "linear.order", epoch)),
        )
        for index, batch in enumerate(order.split(protocol.batch_size)):
            inputs = ((x[batch].float() - mean) / std).to(device)
            loss = F.cross_entropy(head(inputs), train_y[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if protocol.ema:
                debiased_ema_update_(
                    average, head, protocol.ema, epoch * steps_per_epoch + index + 1
                )
        if progress is not None and save:
            progress.save(epoch + 1)
    scored = average if protocol.ema else head
    with torch.no_grad():
        scores = torch.cat(
            [
                scored(((chunk.float() - mean) / std).to(device)).cpu()
                for chunk in test_x.split(4096)
            ]
        )
    return topk_accuracy(scores, test_y)


def heldout_split(length: int, heldout: int, seed: int) -> tuple[Tensor, Tensor]:
    """(fit, held-out) indices: `heldout` training images drawn from `seed`, the rest to fit on."""
    if not 0 < heldout < length:
        raise UserError(
            f"linear.heldout={heldout} must be between 1 and the {length - 1} training images less "
            f"one"
        )
    order = torch.randperm(
        length, generator=torch.Generator().manual_seed(derive_seed(seed, "task.split"))
    )
    return order[heldout:].sort().values, order[:heldout].sort().values


def choose_lr(
    train_x: Tensor,
    train_y: Tensor,
    num_classes: int,
    protocol,
    seed: int,
    device,
    run_dir: Path,
    feature_fn=None,
    save: bool = True,
) -> tuple[float, dict[str, float]]:
    """BYOL's selection: train on the training set less `heldout` images for each lr of `lr_grid`,
    score top-1 on the held-out images (eval-transform features), return the best lr (the first
    among ties) and each
    lr's held-out top-1. Each candidate resumes from its own checkpoint in run_dir."""
    fit, held = heldout_split(len(train_y), protocol.heldout, seed)
    scores = {}
    for lr in protocol.lr_grid:
        fit_features = (lambda epoch: feature_fn(epoch)[fit]) if feature_fn else None
        result = train_linear(
            train_x[fit],
            train_y[fit],
            train_x[held],
            train_y[held],
            num_classes,
            protocol,
            seed,
            device,
            run_dir / f"linear_select_lr{lr:g}.pt",
            fit_features,
            save,
            lr=lr,
        )
        scores[f"{lr:g}"] = result["top1"]
        log.info("linear: lr %g -> held-out top-1 %.2f", lr, result["top1"])
    best = max(protocol.lr_grid, key=lambda lr: scores[f"{lr:g}"])
    return best, scores


# ------------------------------------------------------------------------------------------- task


def prepare(config: Config):
    """The train and test sets; both must hold the same classes."""
    d = config.data
    train_set = build_dataset(d.dataset, d.root, d.train_split, d.limit_train)
    test_set = build_dataset(d.dataset, d.root, d.test_split, d.limit_test)
    if config.linear.lr_grid and not 0 < config.linear.heldout < len(train_set):
        raise UserError(
            f"linear.lr_grid needs linear.heldout between 1 and {len(train_set) - 1} (training "
            f"images to "
            f"choose the lr on), got {config.linear.heldout}"
        )
    if list(train_set.classes) != list(test_set.classes):
        raise UserError(
            f"the {d.train_split} split has {len(train_set.classes)} classes and the "
            f"{d.test_split} split "
            f"{len(test_set.classes)}; both must hold the same class folders"
        )
    return train_set, test_set


def run_linear(config: Config, backbone: Backbone, task_run, data) -> TaskResult:
    return evaluate("linear", config, backbone, task_run, data)


def run_knn(config: Config, backbone: Backbone, task_run, data) -> TaskResult:
    return evaluate("knn", config, backbone, task_run, data)


def evaluate(task: str, config: Config, backbone: Backbone, task_run, data) -> TaskResult:
    """Features of the train and test sets (cached), then kNN or the linear classifier (`task`)."""
    processes = init_distributed()
    train_set, test_set = data
    d = config.data
    num_classes = len(train_set.classes)
    device = pick_device(config.device)
    model = backbone.model()
    transform = eval_transform(d.image_size, d.mean, d.std, d.resize_ratio)
    cache = FeatureCache(config.cache_dir)

    def features(dataset, split, limit):
        description = {
            "dataset": d.dataset,
            "root": d.root,
            "split": split,
            "limit": limit,
            "transform": repr(transform),
        }
        return cached_features(
            backbone,
            model,
            Transformed(dataset, transform),
            description,
            cache,
            config.extract_batch_size,
            d.num_workers,
            device,
        )

    train_x, train_y, train_hit = features(train_set, d.train_split, d.limit_train)
    test_x, test_y, test_hit = features(test_set, d.test_split, d.limit_test)
    chosen, varies = {}, {}
    if task == "knn":
        scores = knn_scores(
            train_x, train_y, test_x, num_classes, config.knn.k, config.knn.temperature
        )
        metrics, protocol = (
            topk_accuracy(scores, test_y),
            f"knn k={config.knn.k} T={config.knn.temperature}",
        )
        # eval-transform features of fixed weights, no seed: one answer
        varies = dict.fromkeys(metrics, False)
    else:
        feature_fn = None
        # the standard protocol: new random crops every epoch, so no cache
        if config.linear.augment:
            train_transform = v2.Compose(
                [
                    v2.ToImage(),
                    InceptionCrop(d.image_size),
                    v2.RandomHorizontalFlip(),
                    v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize(list(d.mean), list(d.std)),
                ]
            )
            augmented = SeededTransformed(train_set, train_transform, config.seed)
            epoch_cache = FeatureCache(task_run.run_dir / "epoch_features")

            def feature_fn(epoch):  # one epoch's features on disk at a time (ImageNet's are 10 GB)
                augmented.epoch = epoch
                x = cached_features(
                    backbone,
                    model,
                    augmented,
                    {"epoch": epoch},
                    epoch_cache,
                    config.extract_batch_size,
                    d.num_workers,
                    device,
                    key=f"epoch{epoch}",
                )[0]
                if processes.rank == 0:
                    for old in epoch_cache.root.glob("epoch*"):
                        if old.name != f"epoch{epoch}":
                            shutil.rmtree(old, ignore_errors=True)
                return x

        lr = config.linear.lr
        if config.linear.lr_grid:
            lr, held_out = choose_lr(
                train_x,
                train_y,
                num_classes,
                config.linear,
                config.seed,
                device,
                task_run.run_dir,
                feature_fn,
                processes.rank == 0,
            )
            chosen = {"chosen_lr": lr, "heldout_top1": held_out, "heldout": config.linear.heldout}
        metrics = train_linear(
            train_x,
            train_y,
            test_x,
            test_y,
            num_classes,
            config.linear,
            config.seed,
            device,
            task_run.run_dir / "linear_last.pt",
            feature_fn,
            save=processes.rank == 0,
            lr=lr,
        )
        if processes.rank == 0:
            shutil.rmtree(task_run.run_dir / "epoch_features", ignore_errors=True)
        protocol = f"linear {config.linear.optimizer} {config.linear.epochs} epochs" + (
            " augmented" if config.linear.augment else " cached features"
        )
    # few labels are another protocol: the report keeps them apart from all labels
    if d.limit_train:
        protocol += f", the first {d.limit_train} training images"
    extra = {"feature_cache_hit": bool(train_hit and test_hit), "world_size": processes.world_size}
    return TaskResult(metrics, d.dataset, protocol, {**extra, **chosen}, varies_with_seed=varies)
