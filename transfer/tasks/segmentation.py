"""Semantic segmentation transfer through mmsegmentation's own Runner, datasets and IoUMetric.

The protocol (BYOL appendix D.4): an FCN on the backbone with conv5 dilated (stride 1, dilation 2);
the head is 2 x [3x3 conv 256, dilation 6, BN, ReLU] + a 1x1 classifier; random scale 0.5-2, crop,
flip; SGD with momentum 0.9, weight decay 1e-4, lr x0.1 at 70% and 90% of the iterations; mIoU on
the validation split. With data.scale empty, training rescales the original image by a ratio drawn
from ratio_range and testing reads it at its original size (BYOL D.4); with data.scale (w, h), the
image is first fitted into it (mmseg's RandomResize). mmsegmentation's `ResNet` is used with its
torchvision-style stem (conv1 7x7), not the deep-stem ResNetV1c.

The backbone comes from the canonical weights through the mmseg export (transfer.export) and
init_cfg= Pretrained. mmengine loads non-strictly and only logs mismatches, so a hook
(transfer.mmseg_glue) compares every backbone tensor of the built model with the file before the
first iteration and stops the run on any difference."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from common.checks import NON_NEGATIVE, POSITIVE_INT, between, checked, each, greater_than, one_of
from common.distributed import barrier, check_global_batch, detect, init_distributed
from common.errors import UserError
from common.files import atomic_write_bytes
from common.seeds import derive_seed
from transfer import export
from transfer.backbone import Backbone
from transfer.runner import TaskResult
from transfer.scenes import CLASSES
from transfer.tasks.contract import TaskConfig

log = logging.getLogger("transfer")


@dataclass
class SegmentationData:
    # transfer scenes' VOC folder | PASCAL VOC 2012 + aug
    dataset: str = checked("scenes", one_of("scenes", "voc"))
    root: str = "runs/scenes/voc/VOC2012"  # the folder holding JPEGImages/
    train_list: str = "ImageSets/Segmentation/train.txt"
    val_list: str = "ImageSets/Segmentation/val.txt"
    train_labels: str = "SegmentationClass"
    # VOC: ImageSets/Segmentation/aug.txt, as mmseg's voc_aug converter writes it
    aug_list: str = ""
    # its labels; trained on with train_list's images (empty aug_list: none)
    aug_labels: str = "SegmentationClassAug"
    val_labels: str = "SegmentationClass"
    # schedule.lr_grid: training images (train + aug lists) held out to
    heldout: int = checked(0, NON_NEGATIVE)
    #                                          choose the lr on
    # (w, h) each image is fitted into
    scale: tuple = checked((128, 128), each(POSITIVE_INT, 2, empty=True))
    #                                         before the random rescale and for testing; []: the
    # original image
    crop: tuple[int, int] = checked((96, 96), each(POSITIVE_INT, 2))
    ratio_range: tuple[float, float] = checked((0.5, 2.0), each(greater_than(0), 2, ordered=True))
    num_workers: int = checked(2, NON_NEGATIVE)


@dataclass
class SegmentationSchedule:
    iterations: int = checked(300, POSITIVE_INT)
    batch_size: int = checked(8, POSITIVE_INT)  # global: over all processes, each takes its share
    lr: float = checked(0.01, greater_than(0))
    momentum: float = checked(0.9, between(0, 1, open_high=True))
    weight_decay: float = checked(1e-4, NON_NEGATIVE)
    milestones: tuple[float, float] = checked((0.7, 0.9), each(between(0, 1), 2, ordered=True))
    # choose lr among these (BYOL D.4: five)
    lr_grid: tuple = checked((), each(greater_than(0), empty=True))
    log_interval: int = checked(50, POSITIVE_INT)
    checkpoint_interval: int = checked(100, POSITIVE_INT)


@dataclass
class Config(TaskConfig):
    run_dir: str = "runs/segmentation"
    data: SegmentationData = field(default_factory=SegmentationData)
    schedule: SegmentationSchedule = field(default_factory=SegmentationSchedule)
    head_channels: int = checked(256, POSITIVE_INT)
    dropout: float = checked(0.1, between(0, 1, open_high=True))
    sync_bn: bool = True  # SyncBN when distributed


# ------------------------------------------------------------------------------------------- task

EXAMPLES = """\
examples:
  python -m transfer scenes --out runs/scenes
  python -m transfer segmentation --backbone runs/fm/checkpoints/last.pt \\
      --config configs/transfer/segmentation_scenes.yaml
  python -m transfer segmentation --backbone r50.pth --config configs/transfer/segmentation_voc_fcn.yaml
Keys and defaults: transfer/tasks/segmentation.py (Config). mmseg's logs and checkpoints: RUN_DIR/mmseg."""


def prepare(config: Config) -> None:
    from transfer import mmseg_glue

    check_global_batch("schedule.batch_size", config.schedule.batch_size, detect().world_size)
    for split in ("train", "val"):  # refuses missing files
        mmseg_glue.dataset_config(config.data, split, [])
    if config.schedule.lr_grid:
        total = len(training_images(config.data))
        if not 0 < config.data.heldout < total:
            raise UserError(
                f"schedule.lr_grid needs data.heldout between 1 and {total - 1} (training images "
                f"to choose "
                f"the lr on), got {config.data.heldout}"
            )


def training_images(d: SegmentationData) -> list[tuple[str, str]]:
    """(image id, label folder) of every training image: train_list's, then aug_list's."""
    parts = [(d.train_list, d.train_labels)] + ([(d.aug_list, d.aug_labels)] if d.aug_list else [])
    return [
        (line.strip(), labels)
        for listing, labels in parts
        for line in (Path(d.root) / listing).read_text().splitlines()
        if line.strip()
    ]


def heldout_lists(config: Config, folder: Path) -> dict[str, Path]:
    """Split the training images (train_list + aug_list) by a seeded permutation: `heldout` of them
    to choose the lr on, the rest to fit on. Written in `folder` (the same split on every rank and
    every rerun): fit_train.txt and fit_aug.txt (each list's images that stay, trained with that
    list's labels), heldout.txt, and
    heldout_labels/ (a link to each held-out image's label, from whichever folder holds it)."""
    d = config.data
    images = training_images(d)
    order = list(range(len(images)))
    random.Random(derive_seed(config.seed, "task.split")).shuffle(order)
    held = set(order[: d.heldout])
    labels = folder / "heldout_labels"
    labels.mkdir(parents=True, exist_ok=True)
    lists = {
        "fit_train": [
            i for i, (_, f) in enumerate(images) if i not in held and f == d.train_labels
        ],
        "fit_aug": [i for i, (_, f) in enumerate(images) if i not in held and f != d.train_labels],
        "heldout": sorted(held),
    }
    paths = {}
    for name, chosen in lists.items():
        paths[name] = folder / f"{name}.txt"
        text = "".join(f"{images[i][0]}\n" for i in chosen)
        if not paths[name].exists() or paths[name].read_text() != text:
            paths[name].write_text(text)
    for i in held:
        image_id, source = images[i]
        link = labels / f"{image_id}.png"
        if not link.is_symlink():
            link.symlink_to((Path(d.root) / source / f"{image_id}.png").resolve())
    paths["heldout_labels"] = labels
    return paths


def choose_lr(config: Config, train_one) -> tuple[float, dict[str, float]]:
    """BYOL D.4's selection: for each lr of schedule.lr_grid, train on the training images (train +
    aug lists) less `heldout` of them and score mIoU on those; return the best lr (the first among
    ties) and each lr's held-out
    mIoU. Each candidate runs in RUN_DIR/select/lr<lr>/ and resumes there."""

    folder = Path(config.run_dir) / "select"
    if detect().rank == 0:
        heldout_lists(config, folder)
    barrier()
    lists = {
        name: str((folder / f"{name}.txt").resolve())
        for name in ("fit_train", "fit_aug", "heldout")
    }
    scores = {}
    for lr in config.schedule.lr_grid:
        result = folder / f"lr{lr:g}.json"
        if result.exists():
            scores[f"{lr:g}"] = json.loads(result.read_text())["mIoU"]
            continue
        candidate = OmegaConf.merge(
            config,
            {
                "run_dir": str(folder / f"lr{lr:g}"),
                "schedule": {"lr": lr},
                "data": {
                    "train_list": lists["fit_train"],
                    "aug_list": lists["fit_aug"] if config.data.aug_list else "",
                    "val_list": lists["heldout"],
                    "val_labels": str((folder / "heldout_labels").resolve()),
                },
            },
        )
        scores[f"{lr:g}"] = train_one(candidate)["mIoU"]
        # atomically: a rerun reads it back instead of training the candidate again
        if detect().rank == 0:
            atomic_write_bytes(result, json.dumps({"lr": lr, "mIoU": scores[f"{lr:g}"]}).encode())
        log.info("segmentation: lr %g -> held-out mIoU %.2f", lr, scores[f"{lr:g}"])
    return max(config.schedule.lr_grid, key=lambda lr: scores[f"{lr:g}"]), scores


def run(config: Config, backbone: Backbone, task_run, data) -> TaskResult:
    """Train and evaluate with mmseg; metrics are mmseg's (mIoU, mAcc, aAcc in percent,
    IoU.<class>). With
    schedule.lr_grid, the lr is chosen first on held-out training images (`choose_lr`)."""

    from transfer import mmseg_glue

    init_distributed()  # here, not by mmengine: its launcher insists on a GPU
    weights_file = export.write(backbone, "mmseg", task_run.run_dir / "backbone.mmseg.pth")
    num_classes = len(CLASSES) if config.data.dataset == "scenes" else 21

    def train_one(run_config: Config) -> dict[str, float]:
        return mmseg_glue.train_and_evaluate(run_config, backbone, weights_file, num_classes)

    extra = {}
    if config.schedule.lr_grid:
        lr, held_out = choose_lr(config, train_one)
        config = OmegaConf.merge(config, {"schedule": {"lr": lr}})
        extra = {"chosen_lr": lr, "heldout_mIoU": held_out, "heldout": config.data.heldout}
    metrics = train_one(config)
    return TaskResult(
        metrics,
        config.data.dataset,
        f"fcn dilated-c5, {config.schedule.iterations} iterations",
        extra,
    )
