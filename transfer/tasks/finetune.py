"""The finetune task: semi-supervised evaluation, fine-tuning the whole network on a fraction of the
labels (BYOL App. C.1; SimCLR's 1% / 10% ImageNet protocol).

For each label fraction f, the labelled images are
* ImageNet (data.subsets=simclr): SimCLR's published 1% / 10% subsets (transfer/splits), matched by
  file name in root/<train_split>; every listed image must be there;
* any other dataset (data.subsets=balanced): per class, max(1, round(f n_c)) images drawn from the
  seed, the smaller fractions nested in the larger (transfer.subsets.balanced_subset).
The run dir records each fraction's images in split_<f>%.txt. `data.heldout` training images outside every
labelled subset (BYOL: 10,009) choose the learning rate x epochs (x weight decay) of the grid
(transfer.finetuner.select_and_finetune); the chosen values and every candidate's held-out top-1 go
into metrics.json, and the chosen network's top-1 and top-5 on the test split are the result:
metrics top1@<f>% and top5@<f>%. A candidate that diverges is recorded as failed (with its loss) and
the selection goes on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from common.checks import NON_NEGATIVE, POSITIVE_INT, between, checked, each, one_of
from common.distributed import init_distributed
from common.errors import UserError
from common.rundir import pick_device
from common.seeds import derive_seed
from pretrain.data import build_dataset
from pretrain.networks import feature_width
from transfer.backbone import Backbone
from transfer.features import topk_accuracy
from transfer.finetuner import FinetuneProtocol, Finetuner, Images, select_and_finetune
from transfer.logistic import top1
from transfer.runner import TaskResult
from transfer.subsets import balanced_subset, imagenet_subset, write_split
from transfer.tasks.contract import TaskConfig


@dataclass
class FinetuneData:
    # imagefolder: root/<split>/<class>/
    dataset: str = checked("fashion_mnist", one_of("fashion_mnist", "imagefolder"))
    root: str = "/usr/share/datasets/fashion-mnist"
    train_split: str = "train"
    test_split: str = "test"
    fractions: tuple = checked((0.01, 0.1), each(between(0, 1, open_low=True)))
    # simclr: ImageNet's published 1% / 10% files
    subsets: str = checked("balanced", one_of("balanced", "simclr"))
    # training images outside the labelled subsets, to choose on
    heldout: int = checked(10_009, POSITIVE_INT)
    limit_train: int = checked(0, NON_NEGATIVE)  # 0 = all
    limit_test: int = checked(0, NON_NEGATIVE)


@dataclass
class Config(TaskConfig):
    run_dir: str = "runs/finetune"
    data: FinetuneData = field(default_factory=FinetuneData)
    images: Images = field(default_factory=Images)
    finetune: FinetuneProtocol = field(default_factory=FinetuneProtocol)


EXAMPLES = """\
examples:
  python -m transfer finetune --backbone runs/fm/checkpoints/last.pt \\
      --config configs/transfer/finetune_fashion_mnist.yaml
  python -m transfer finetune --backbone r50.pth --config configs/transfer/finetune_imagenet.yaml \\
      data.root=/data/imagenet
Keys and defaults: transfer/tasks/finetune.py (Config), transfer/finetuner.py (FinetuneProtocol, Images)."""


def percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def image_names(dataset, split: str) -> list[str]:
    """A name per training image for the split files: the path under the split folder, or
    fashion_mnist/<split>/i."""
    if hasattr(dataset, "samples"):
        return [str(Path(path).relative_to(Path(path).parents[1])) for path, _ in dataset.samples]
    return [f"fashion_mnist/{split}/{i}" for i in range(len(dataset))]


def simclr_subset(dataset, fraction: float, root: Path) -> list[int]:
    """Indices of SimCLR's subset in an ImageNet folder; every listed image must be present."""
    wanted = imagenet_subset(round(fraction * 100)) if round(fraction * 100, 6) in (1, 10) else None
    if wanted is None:
        raise UserError(
            "data.subsets=simclr has ImageNet's 1% and 10% subsets (fractions 0.01, 0.1), not "
            f"{fraction}"
        )
    by_name = {Path(path).name: index for index, (path, _) in enumerate(dataset.samples)}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise UserError(
            f"{len(missing)} of the {len(wanted)} images of SimCLR's {percent(fraction)} split are "
            f"not in "
            f"{root} (first: {missing[0]}); point data.root at the full ImageNet train "
            f"folder"
        )
    return sorted(by_name[name] for name in wanted)


def labels_of(dataset) -> list[int]:
    return (
        [label for _, label in dataset.samples]
        if hasattr(dataset, "samples")
        else dataset.labels.tolist()
    )


def prepare(config: Config):
    """The training and test sets, the labelled indices per fraction and the held-out indices."""

    d = config.data
    if d.subsets == "simclr" and d.dataset != "imagefolder":
        raise UserError(
            "data.subsets=simclr takes ImageNet's published files: it needs "
            "data.dataset=imagefolder"
        )
    train_set = build_dataset(d.dataset, d.root, d.train_split, d.limit_train)
    test_set = build_dataset(d.dataset, d.root, d.test_split, d.limit_test)
    if list(train_set.classes) != list(test_set.classes):
        raise UserError(
            f"the {d.train_split} split has {len(train_set.classes)} classes and the "
            f"{d.test_split} split "
            f"{len(test_set.classes)}; both must hold the same class folders"
        )
    labels = labels_of(train_set)
    if d.subsets == "simclr":
        subsets = {
            f: simclr_subset(train_set, f, Path(d.root) / d.train_split) for f in d.fractions
        }
    else:
        subsets = {f: balanced_subset(labels, f, config.seed) for f in d.fractions}
    labelled = set().union(*subsets.values())
    pool = np.setdiff1d(np.arange(len(labels)), np.fromiter(labelled, dtype=np.int64))
    if len(pool) < d.heldout:
        raise UserError(
            f"data.heldout={d.heldout} needs that many training images outside the labelled "
            f"subsets; "
            f"only {len(pool)} are; lower data.heldout or the fractions"
        )
    rng = np.random.Generator(np.random.PCG64(derive_seed(config.seed, "task.split")))
    heldout = sorted(rng.choice(pool, size=d.heldout, replace=False).tolist())
    for fraction, indices in subsets.items():
        if len(indices) < config.finetune.batch_size:
            raise UserError(
                f"the {percent(fraction)} subset has {len(indices)} images, fewer than one batch "
                f"(finetune.batch_size={config.finetune.batch_size}); lower the batch "
                f"size"
            )
    return train_set, test_set, subsets, heldout


def run(config: Config, backbone: Backbone, task_run, data) -> TaskResult:
    processes = init_distributed()
    train_set, test_set, subsets, heldout = data
    is_main = processes.rank == 0
    device = pick_device(config.device)
    names = image_names(train_set, config.data.train_split)
    metrics, chosen = {}, {}
    for fraction, indices in subsets.items():
        label = percent(fraction)
        if is_main:
            write_split(task_run.run_dir / f"split_{label}.txt", [names[i] for i in indices])
        finetuner = Finetuner(
            backbone.model,
            feature_width(backbone.arch),
            len(train_set.classes),
            config.finetune,
            config.images,
            top1,
            config.seed,
            device,
            task_run.run_dir / "finetune" / label,
            is_main,
            test_metrics={"top5": lambda scores, y: topk_accuracy(scores, y, (5,))["top5"]},
        )
        result = select_and_finetune(
            finetuner, Subset(train_set, indices), Subset(train_set, heldout), test_set
        )
        metrics[f"top1@{label}"] = result["test"]
        metrics[f"top5@{label}"] = result["test_metrics"]["top5"]
        chosen[label] = {
            "labelled_images": len(indices),
            "chosen": result["chosen"],
            "heldout_top1": result["heldout"],
            "failed": result["failed"],
        }
    protocol = (
        f"finetune {'SimCLR' if config.data.subsets == 'simclr' else 'balanced'} subsets, SGD "
        f"Nesterov, "
        f"batch {config.finetune.batch_size}, grid on {config.data.heldout} held-out"
    )
    return TaskResult(
        metrics,
        config.data.dataset,
        protocol,
        {"fractions": chosen, "heldout": config.data.heldout, "world_size": processes.world_size},
    )
