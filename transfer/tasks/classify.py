"""The classify task: transfer to other classification datasets (BYOL App. D, Kornblith et al.
2019).

One dataset per run (data.dataset; readers and standard splits in transfer.classify_datasets), one
or both
protocols:
* linear: frozen features (the short side resized to 224, a 224 centre crop), cached
  (transfer.features.cached_features), not standardised (linear.standardize: optional); multinomial
  logistic regression by L-BFGS over 45 log-spaced l2 penalties in [1e-6, 1e5], chosen on the
  validation split, refitted on train + validation, scored on test
  (transfer.logistic.select_and_fit); for the multi-label VOC2007, one binary classifier per class
  (select_and_fit_multilabel);
* finetune: the whole network and a new head (transfer.finetuner): 20,000 steps at batch 256, SGD
  Nesterov 0.9, lr from 7 log-spaced values in [1e-4, 1e-1] x weight decay from {0} and 7 log-spaced
  values in [1e-6, 1e-3] divided by the lr, BatchNorm momentum max(1 - 10/s, 0.9) (TensorFlow's
  convention; s steps per epoch), chosen on the validation split; the chosen candidate retrained on
  train + validation and scored on test.
Each dataset reports its own metric: mean per-class accuracy for Aircraft, Pets, Caltech-101 and Flowers,
11-point mAP for VOC2007, top-1 for the others; metrics.json holds linear.<metric> and
finetune.<metric>."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from torch.utils.data import ConcatDataset

from common.checks import POSITIVE_INT, Rule, at_least, between, checked, each, one_of, optional
from common.distributed import init_distributed
from common.errors import UserError
from common.rundir import pick_device
from pretrain.augment import eval_transform
from pretrain.networks import feature_width
from transfer import logistic
from transfer.backbone import Backbone
from transfer.classify_datasets import DATASETS, load_splits
from transfer.features import FeatureCache, Transformed, cached_features
from transfer.finetuner import FinetuneProtocol, Finetuner, Images, select_and_finetune
from transfer.runner import TaskResult
from transfer.tasks.contract import TaskConfig

PROTOCOLS = ("linear", "finetune")


def log_grid(low: float, high: float, count: int) -> tuple[float, ...]:
    """`count` log-spaced values from 10^low to 10^high, to 6 significant digits."""
    return tuple(float(f"{value:.6g}") for value in np.logspace(low, high, count))


@dataclass
class ClassifyData:
    dataset: str = checked("digits", one_of(*DATASETS))
    root: str = ""  # where the dataset lies in its standard layout
    val_fraction: Optional[float] = checked(
        None, optional(between(0, 1, open_low=True, open_high=True))
    )  # null:
    #   the dataset's published hold-out (BYOL Table 10: transfer/classify_datasets.py); a value:
    # that share per class


@dataclass
class LinearTransfer:
    # L-BFGS iterations per penalty (to convergence or this many)
    max_iter: int = checked(1000, POSITIVE_INT)
    # short side resized to images.size x this, then the centre
    resize_ratio: float = checked(1.0, at_least(1.0))
    #                                                    crop: 1.0 = Kornblith et al.'s resize 224,
    # crop 224
    # features standardised with the training split's mean / std (not in the protocol)
    standardize: bool = False


@dataclass
class Config(TaskConfig):
    run_dir: str = "runs/classify"
    data: ClassifyData = field(default_factory=ClassifyData)
    images: Images = field(default_factory=Images)
    linear: LinearTransfer = field(default_factory=LinearTransfer)
    protocols: tuple = checked(
        PROTOCOLS, each(Rule("linear or finetune", lambda v: v in PROTOCOLS))
    )
    finetune: FinetuneProtocol = field(
        default_factory=lambda: FinetuneProtocol(
            batch_size=256,
            steps=20_000,
            lr_grid=log_grid(-4, -1, 7),
            weight_decay_grid=(0.0, *log_grid(-6, -3, 7)),
            weight_decay_over_lr=True,
            # Kornblith et al. 2019 / SimCLR App. B.8
            bn_momentum_from_epoch=True,
            checkpoint_steps=1000,
        )
    )
    extract_batch_size: int = checked(256, POSITIVE_INT)
    cache_dir: str = "~/.cache/ssl-hsic/features"


EXAMPLES = """\
examples:
  python -m transfer classify --backbone runs/fm/checkpoints/last.pt --config configs/transfer/classify_digits.yaml
  python -m transfer classify --backbone r50.pth --config configs/transfer/classify_kornblith.yaml data.dataset=pets \\
      data.root=/data/pets
Keys and defaults: transfer/tasks/classify.py (Config); datasets and layouts: transfer/classify_datasets.py."""


def metric_function(name: str):
    return {
        "top1": logistic.top1,
        "mean_per_class": logistic.mean_per_class_accuracy,
        "voc07_map": logistic.voc07_map,
    }[name]


def prepare(config: Config):
    if not config.protocols:
        raise UserError("protocols is empty; choose linear, finetune or both")
    return load_splits(config.data.dataset, config.data.root, config.seed, config.data.val_fraction)


def run(config: Config, backbone: Backbone, task_run, data) -> TaskResult:
    processes = init_distributed()
    device = pick_device(config.device)
    metrics, varies, extra = (
        {},
        {},
        {
            "val_source": data.val_source,
            "world_size": processes.world_size,
            "sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        },
    )
    if "linear" in config.protocols:
        result = linear(config, backbone, data, device)
        metrics[f"linear.{data.metric}"] = result["test"]
        # L-BFGS from zero on eval-transform features: the seed reaches it only through a held-out
        # validation split
        varies[f"linear.{data.metric}"] = not DATASETS[config.data.dataset].standard_val
        extra["linear"] = {
            "penalty": result["penalty"],
            "validation": result["validation"],
            "standardize": result["standardize"],
            "feature_cache_hit": result["cache_hit"],
        }
    if "finetune" in config.protocols:
        finetuner = Finetuner(
            backbone.model,
            feature_width(backbone.arch),
            len(data.classes),
            config.finetune,
            config.images,
            metric_function(data.metric),
            config.seed,
            device,
            task_run.run_dir / "finetune",
            processes.rank == 0,
        )
        result = select_and_finetune(
            finetuner, data.train, data.val, data.test, refit=ConcatDataset([data.train, data.val])
        )
        metrics[f"finetune.{data.metric}"] = result["test"]
        extra["finetune"] = {
            "chosen": result["chosen"],
            "validation": result["heldout"],
            "failed": result["failed"],
        }
    protocol = f"{'+'.join(config.protocols)} (Kornblith et al. 2019), {data.metric}"
    return TaskResult(metrics, config.data.dataset, protocol, extra, varies_with_seed=varies)


def linear(config: Config, backbone: Backbone, data, device) -> dict:
    """Cached frozen features of the three splits, then the penalty sweep."""
    # the short side resized to size x linear.resize_ratio, then the centre crop
    images = config.images
    transform = eval_transform(images.size, images.mean, images.std, config.linear.resize_ratio)
    model, cache = backbone.model(), FeatureCache(config.cache_dir)
    splits, hits = {}, []
    for name in ("train", "val", "test"):
        description = {
            "dataset": config.data.dataset,
            "root": config.data.root,
            "split": name,
            "seed": config.seed if name != "test" else None,
            "val_fraction": config.data.val_fraction,
            "transform": repr(transform),
        }
        x, y, hit = cached_features(
            backbone,
            model,
            Transformed(getattr(data, name), transform),
            description,
            cache,
            config.extract_batch_size,
            config.images.num_workers,
            device,
        )
        splits[name], _ = (x, y), hits.append(hit)
    if data.multilabel:
        result = logistic.select_and_fit_multilabel(
            splits["train"],
            splits["val"],
            splits["test"],
            max_iter=config.linear.max_iter,
            standardize=config.linear.standardize,
        )
    else:
        result = logistic.select_and_fit(
            splits["train"],
            splits["val"],
            splits["test"],
            len(data.classes),
            metric=metric_function(data.metric),
            max_iter=config.linear.max_iter,
            standardize=config.linear.standardize,
        )
    return {**result, "cache_hit": all(hits)}
