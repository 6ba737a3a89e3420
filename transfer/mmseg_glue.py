"""All of this project's mmsegmentation / mmengine glue, in one place; mmseg is imported inside the
functions.

* `register_modules()`: mmseg's registry plus seven of ours: ResNetTable (mmseg's ResNet with every
  depth of the architecture table in its arch_settings: ResNet-200), RandomRescale (a random rescale
  of the original image, which mmcv's RandomResize cannot express: it scales a reference size),
  GeneratedScenesDataset (PascalVOCDataset's loading with the generated scenes' 11 classes; mmseg
  only narrows a dataset's classes to a subset, so the scenes need their own class),
  PerClassIoUMetric (IoUMetric plus IoU.<class>) and BackboneLoadCheckHook (mmengine loads
  pretrained weights non-strictly and only logs mismatches, so before the first iteration every
  backbone tensor is compared with the file and the run stops on any difference); and two hooks that
  make a run preempted at any moment resume to the numbers of an uninterrupted one:
  AtomicCheckpointHook (mmengine's CheckpointHook deletes the previous checkpoint before it writes
  the next, both it and last_checkpoint in place) and TorchRngStateHook (mmengine does not restore
  the torch generator, which the head's dropout draws).
* `model_config(config, backbone, weights, num_classes, distributed, world_size)`: the segmentation
  protocol's complete mmengine config (a dict), built from the task's config; `dataset_config`
  its datasets (refusing missing files: the task's prepare calls it).
* `train_and_evaluate(config, backbone, weights, num_classes)`: mmengine's Runner on that config,
  resuming from work_dir's last checkpoint (logged), then its validation loop.
* `resnet_backbone(arch, **settings)`: the backbone config of an architecture of the table: depth,
  stem_channels (64 w) and base_channels (64 w; mmseg's stage i is base_channels * 2^i wide, times
  the block's expansion out), type ResNet, or ResNetTable for a depth mmseg's ResNet lacks.
* `pretrained_resnet(arch, path)`: mmseg's ResNet loaded the way mmseg loads pretrained weights
  (verify).
* `trusting(folder)`: the one patch of mmengine. torch 2.6 made torch.load default to
  weights_only=True; mmengine 0.10.7 calls torch.load(filename) for local files and its training
  checkpoints hold its own objects (the message hub's HistoryBuffer, numpy values), so resuming
  fails. While active, a local loader keeps weights_only=True for every file except those under
  `folder`, the run's own work_dir, which only this run wrote. Newer mmengine releases pass
  weights_only themselves; the patch applies only while torch.load defaults to weights_only.
"""

from __future__ import annotations

import logging
import os
import os.path as osp
from contextlib import contextmanager
from pathlib import Path

import torch

from common.distributed import init_distributed
from common.errors import UserError
from common.files import remove_partial_writes
from pretrain.networks import ARCHITECTURES, architecture, feature_width
from transfer.backbone import Backbone

log = logging.getLogger("transfer")


def _defaults_to_weights_only() -> bool:
    import inspect

    return "weights_only" in inspect.signature(torch.load).parameters and tuple(
        int(p) for p in torch.__version__.split("+")[0].split(".")[:2]
    ) >= (2, 6)


@contextmanager
def trusting(folder: str | Path):
    from mmengine.runner.checkpoint import CheckpointLoader

    if not _defaults_to_weights_only():
        yield
        return
    trusted = str(Path(folder).resolve()) + osp.sep
    original = CheckpointLoader._schemes[""]

    def load_from_local(filename, map_location):
        filename = osp.expanduser(filename)
        if not osp.isfile(filename):
            raise FileNotFoundError(f"{filename} can not be found.")
        own = str(Path(filename).resolve()).startswith(trusted)
        return torch.load(filename, map_location=map_location, weights_only=not own)

    CheckpointLoader._schemes[""] = load_from_local
    try:
        yield
    finally:
        CheckpointLoader._schemes[""] = original


# The depths of mmseg 1.x's ResNet.arch_settings (mmseg/models/backbones/resnet.py); ResNetTable
# adds the table's others.
MMSEG_DEPTHS = (18, 34, 50, 101, 152)


def register_resnet_table() -> None:
    """ResNetTable: mmseg's ResNet whose arch_settings hold every depth of the architecture table
    (ResNet-200:
    Bottleneck, (3, 24, 36, 3)), registered in mmseg's MODELS; otherwise the same class."""
    from mmseg.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
    from mmseg.registry import MODELS

    settings = dict(ResNet.arch_settings)
    for spec in ARCHITECTURES.values():
        settings.setdefault(
            spec.depth, (BasicBlock if spec.block == "basic" else Bottleneck, spec.layers)
        )

    class ResNetTable(ResNet):
        """mmseg's ResNet with the depths of this project's architecture table
        (pretrain.networks)."""

        arch_settings = settings

    MODELS.register_module("ResNetTable", module=ResNetTable, force=True)


def resnet_backbone(arch: str, **settings) -> dict:
    """The mmseg backbone config of an architecture of the table, plus `settings`: its depth and
    channel counts
    (stem_channels = 64 w; base_channels = 64 w: mmseg's stage i has base_channels * 2^i planes and that times the
    block's expansion out, as the table); type ResNet where mmseg's ResNet has the depth, else
    ResNetTable (register_modules registers it)."""
    spec = architecture(arch)
    return dict(
        type="ResNet" if spec.depth in MMSEG_DEPTHS else "ResNetTable",
        depth=spec.depth,
        stem_channels=spec.stem_channels,
        base_channels=64 * spec.width,
        **settings,
    )


def register_modules() -> None:
    """mmseg's registry, ResNetTable, GlobalBN, the data modules (the original-size random rescale,
    the scenes dataset, the per-class IoU metric) and the hooks (the weight check, the atomic
    checkpoint, the torch RNG
    state)."""
    from mmengine.registry import MODELS as ENGINE_MODELS
    from mmseg.utils import register_all_modules

    from pretrain.sync_batchnorm import GlobalBatchNorm

    register_all_modules()
    register_resnet_table()
    # SyncBN for CPU processes
    ENGINE_MODELS.register_module("GlobalBN", module=GlobalBatchNorm, force=True)
    _register_data_modules()
    _register_hooks()


def _register_data_modules() -> None:
    """RandomRescale, GeneratedScenesDataset and PerClassIoUMetric in mmseg's registries."""
    import numpy as np
    from mmcv.transforms import BaseTransform, Resize
    from mmseg.datasets import PascalVOCDataset
    from mmseg.evaluation import IoUMetric
    from mmseg.registry import DATASETS, METRICS, TRANSFORMS

    from transfer.scenes import CLASSES, voc_palette

    palette = voc_palette()

    @TRANSFORMS.register_module(force=True)
    class RandomRescale(BaseTransform):
        """The image and its label map rescaled by a ratio drawn uniformly from ratio_range (of the
        original size,
        not of a reference scale: BYOL D.4), through mmcv's Resize (bilinear image, nearest label).
        """

        def __init__(self, ratio_range: tuple[float, float]):
            self.ratio_range = tuple(ratio_range)

        def transform(self, results: dict) -> dict:
            ratio = float(np.random.uniform(*self.ratio_range))  # mmengine seeds numpy per worker
            return Resize(scale_factor=ratio, keep_ratio=True)(results)

    @DATASETS.register_module(force=True)
    class GeneratedScenesDataset(PascalVOCDataset):
        METAINFO = dict(
            classes=CLASSES, palette=[palette[3 * i : 3 * i + 3] for i in range(len(CLASSES))]
        )

    @METRICS.register_module(force=True)
    class PerClassIoUMetric(IoUMetric):
        """IoUMetric's aAcc / mIoU / mAcc plus IoU.<class> for each class seen in the labels or
        predictions."""

        def compute_metrics(self, results: list) -> dict:
            metrics = super().compute_metrics(results)
            areas = [sum(column) for column in zip(*results)]
            per_class = self.total_area_to_metrics(*areas, ["mIoU"], self.nan_to_num, self.beta)[
                "IoU"
            ]
            for name, value in zip(self.dataset_meta["classes"], per_class):
                if not np.isnan(value):
                    metrics[f"IoU.{name}"] = round(float(value) * 100, 2)
            return metrics


def _register_hooks() -> None:
    """BackboneLoadCheckHook, AtomicCheckpointHook and TorchRngStateHook in mmseg's hook
    registry."""
    from mmengine.dist import is_main_process
    from mmengine.fileio import LocalBackend
    from mmengine.hooks import CheckpointHook, Hook
    from mmseg.registry import HOOKS

    @HOOKS.register_module(force=True)
    class BackboneLoadCheckHook(Hook):
        """Before the first iteration: every backbone tensor must equal the file's (mmengine
        loads non-strictly)."""

        def __init__(self, weights_file: str):
            self.weights_file = weights_file

        def before_train(self, runner) -> None:
            if runner.iter > 0:  # resumed: the weights come from mmseg's own checkpoint
                return
            expected = torch.load(self.weights_file, map_location="cpu", weights_only=True)[
                "state_dict"
            ]
            model = runner.model.module if hasattr(runner.model, "module") else runner.model
            state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
            missing = sorted(set(state) - set(expected))
            unused = sorted(set(expected) - set(state))
            differ = sorted(
                k
                for k in set(state) & set(expected)
                if not torch.equal(state[k].cpu(), expected[k])
            )
            if missing or unused or differ:
                raise UserError(
                    f"the backbone did not load in full from {self.weights_file}: not in the file "
                    f"{len(missing)} {missing[:4]}, not used {len(unused)} "
                    f"{unused[:4]}, not loaded "
                    f"{len(differ)} {differ[:4]}"
                )

    @HOOKS.register_module(force=True)
    class AtomicCheckpointHook(CheckpointHook):
        """mmengine's CheckpointHook, safe against a kill at any moment (a preempted or requeued
        job).

        mmengine removes the checkpoint beyond max_keep_ckpts first, then writes the new one in
        place, then rewrites last_checkpoint in place: a kill in between leaves last_checkpoint
        naming a deleted or half-written file, and the requeued run cannot resume. Here the new
        checkpoint is written under a temporary name (.iter_N.pth.tmp), fsynced and renamed, then
        last_checkpoint is replaced atomically, and only then are the old checkpoints removed. The
        checkpoint's content (message hub included) is mmengine's."""

        def _save_checkpoint_with_step(self, runner, step, meta):
            if not isinstance(self.file_backend, LocalBackend):
                return super()._save_checkpoint_with_step(runner, step, meta)
            from common.files import atomic_write_bytes

            stale = []
            if self.max_keep_ckpts > 0 and not (
                self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step
            ):
                if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                    stale.append(self.keep_ckpt_ids.popleft())
                self.keep_ckpt_ids.append(step)
                runner.message_hub.update_info("keep_ckpt_ids", list(self.keep_ckpt_ids))
            filename = self.filename_tmpl.format(step)
            self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
            runner.message_hub.update_info("last_ckpt", self.last_ckpt)
            partial = f".{filename}.tmp"
            runner.save_checkpoint(
                self.out_dir,
                partial,
                self.file_client_args,
                save_optimizer=self.save_optimizer,
                save_param_scheduler=self.save_param_scheduler,
                meta=meta,
                by_epoch=self.by_epoch,
                backend_args=self.backend_args,
                **self.args,
            )
            if not is_main_process():  # rank 0 alone writes (Runner.save_checkpoint is master_only)
                return
            _durable_rename(Path(self.out_dir) / partial, Path(self.last_ckpt))
            atomic_write_bytes(
                Path(runner.work_dir) / "last_checkpoint", str(self.last_ckpt).encode()
            )
            for old in stale:
                (Path(self.out_dir) / self.filename_tmpl.format(old)).unlink(missing_ok=True)

    @HOOKS.register_module(force=True)
    class TorchRngStateHook(Hook):
        """The torch generators' state in every checkpoint, restored on resume. mmengine seeds a run
        once, at its start, and restores no generator: the head's dropout then draws other masks
        after a resume than the uninterrupted run. numpy's and python's generators (the random
        rescale, crop and flip) need nothing: a resumed IterBasedTrainLoop runs the data pipeline
        again for every iteration already trained, from the same seed
        (tests/test_slurm_requeue_tasks.py: bitwise equal weights, num_workers 0). Restored after
        mmengine's weight init, which also draws from torch."""

        def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
            checkpoint["torch_rng_state"] = torch.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                checkpoint["cuda_rng_state"] = torch.cuda.get_rng_state()

        def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
            if "torch_rng_state" in checkpoint:
                torch.set_rng_state(checkpoint["torch_rng_state"].cpu())
            if "cuda_rng_state" in checkpoint and torch.cuda.is_available():
                torch.cuda.set_rng_state(checkpoint["cuda_rng_state"].cpu())


def _durable_rename(source: Path, target: Path) -> None:
    """fsync `source`, rename it over `target`, fsync the folder (common.files's atomic write, for a
    file that
    another library wrote)."""
    fd = os.open(source, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(source, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dataset_class(name: str):
    """A registered mmseg dataset class by name (after register_modules)."""
    from mmseg.registry import DATASETS

    register_modules()
    return DATASETS.get(name)


# ---------------------------------------------------------------------------- the model config

AUG_LAYOUT = (
    "JPEGImages/, SegmentationClass/ + ImageSets/Segmentation/train.txt and val.txt (VOC 2012), "
    "SegmentationClassAug/ + ImageSets/Segmentation/aug.txt (mmsegmentation's "
    "tools/dataset_converters/voc_aug.py on the SBD release)"
)


def dataset_config(c, split: str, pipeline: list) -> dict:
    """mmseg's dataset config for a split: the training split concatenates train_list (+
    train_labels) and, when set, aug_list (+ aug_labels), as mmsegmentation's own pascal_voc12_aug
    config does."""
    kind = {"scenes": "GeneratedScenesDataset", "voc": "PascalVOCDataset"}.get(c.dataset)
    if kind is None:
        raise UserError(
            f"unknown segmentation dataset '{c.dataset}'; choose scenes or voc (data.dataset)"
        )
    parts = (
        [(c.train_list, c.train_labels)] + ([(c.aug_list, c.aug_labels)] if c.aug_list else [])
        if split == "train"
        else [(c.val_list, c.val_labels)]
    )
    root = Path(c.root)
    for listing, labels in parts:
        missing = [
            str(p) for p in (root / "JPEGImages", root / listing, root / labels) if not p.exists()
        ]
        if missing:
            raise UserError(
                f"segmentation data incomplete under data.root={c.root}: {', '.join(missing)} "
                f"missing; "
                "expected "
                f"{AUG_LAYOUT if c.aug_list else 'JPEGImages/, the list files and label folders'}"
                "; generated scenes: `python -m transfer scenes --out DIR`"
            )
    datasets = [
        dict(
            type=kind,
            data_root=str(root),
            ann_file=listing,
            data_prefix=dict(img_path="JPEGImages", seg_map_path=labels),
            pipeline=pipeline,
        )
        for listing, labels in parts
    ]
    return datasets[0] if len(datasets) == 1 else dict(type="ConcatDataset", datasets=datasets)


def model_config(
    config,
    backbone: Backbone,
    weights: Path,
    num_classes: int,
    distributed: bool,
    world_size: int = 1,
) -> dict:
    """The complete mmengine config of the segmentation task's `config` (transfer.tasks.segmentation)
    on `backbone`'s architecture, loading the mmseg file `weights`, as a plain dict.
    schedule.batch_size is the global batch: each of the `world_size` processes loads batch_size /
    world_size images per iteration."""
    d, s = config.data, config.schedule
    on_gpu = torch.cuda.is_available() and config.device != "cpu"
    synced = "SyncBN" if on_gpu else "GlobalBN"  # torch's SyncBatchNorm refuses CPU tensors
    norm = dict(type=synced if distributed and config.sync_bn else "BN", requires_grad=True)
    # the FCN head's input: the last stage's channels (2048 w; basic: 512 w)
    width = feature_width(backbone.arch)
    rescale = (
        dict(
            type="RandomResize",
            scale=tuple(d.scale),
            ratio_range=tuple(d.ratio_range),
            keep_ratio=True,
        )
        if d.scale
        else dict(type="RandomRescale", ratio_range=tuple(d.ratio_range))
    )
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations"),
        rescale,
        dict(type="RandomCrop", crop_size=tuple(d.crop[::-1]), cat_max_ratio=0.75),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PackSegInputs"),
    ]
    test_resize = [dict(type="Resize", scale=tuple(d.scale), keep_ratio=True)] if d.scale else []
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        *test_resize,
        dict(type="LoadAnnotations"),
        dict(type="PackSegInputs"),
    ]
    return dict(
        default_scope="mmseg",
        work_dir=str(Path(config.run_dir) / "mmseg"),
        randomness=dict(seed=config.seed),
        env_cfg=dict(
            cudnn_benchmark=False,
            mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
            dist_cfg=dict(backend="nccl" if torch.cuda.is_available() else "gloo"),
        ),
        model=dict(
            type="EncoderDecoder",
            data_preprocessor=dict(
                type="SegDataPreProcessor",
                mean=[123.675, 116.28, 103.53],
                std=[58.395, 57.12, 57.375],
                bgr_to_rgb=True,
                pad_val=0,
                seg_pad_val=255,
                size=tuple(d.crop[::-1]),
            ),
            # depth, stem_channels and base_channels of the architecture table; ResNetTable for
            # ResNet-200
            backbone=resnet_backbone(
                backbone.arch,
                num_stages=4,
                out_indices=(3,),
                strides=(1, 2, 2, 1),
                dilations=(1, 1, 1, 2),
                norm_cfg=norm,
                norm_eval=False,
                style="pytorch",
                contract_dilation=False,
                init_cfg=dict(type="Pretrained", checkpoint=str(weights), prefix="backbone."),
            ),
            decode_head=dict(
                type="FCNHead",
                in_channels=width,
                in_index=0,
                channels=config.head_channels,
                num_convs=2,
                kernel_size=3,
                dilation=6,
                concat_input=False,
                dropout_ratio=config.dropout,
                num_classes=num_classes,
                norm_cfg=norm,
                align_corners=False,
                loss_decode=dict(
                    type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, avg_non_ignore=True
                ),
            ),
            train_cfg=dict(),
            test_cfg=dict(mode="whole"),
        ),
        train_dataloader=dict(
            batch_size=s.batch_size // world_size,
            num_workers=d.num_workers,
            persistent_workers=d.num_workers > 0,
            sampler=dict(type="InfiniteSampler", shuffle=True),
            dataset=dataset_config(d, "train", train_pipeline),
        ),
        val_dataloader=dict(
            batch_size=1,
            num_workers=d.num_workers,
            persistent_workers=False,
            sampler=dict(type="DefaultSampler", shuffle=False),
            dataset=dataset_config(d, "val", test_pipeline),
        ),
        val_evaluator=dict(type="PerClassIoUMetric", iou_metrics=["mIoU"]),
        optim_wrapper=dict(
            type="OptimWrapper",
            optimizer=dict(type="SGD", lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay),
        ),
        param_scheduler=[
            dict(
                type="MultiStepLR",
                by_epoch=False,
                begin=0,
                end=s.iterations,
                gamma=0.1,
                milestones=[round(m * s.iterations) for m in s.milestones],
            )
        ],
        train_cfg=dict(
            type="IterBasedTrainLoop", max_iters=s.iterations, val_interval=s.iterations + 1
        ),
        val_cfg=dict(type="ValLoop"),
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=s.log_interval, log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            # written atomically (AtomicCheckpointHook, above), so that a job killed at any moment
            # resumes
            checkpoint=dict(
                type="AtomicCheckpointHook",
                by_epoch=False,
                interval=s.checkpoint_interval,
                max_keep_ckpts=1,
            ),
            sampler_seed=dict(type="DistSamplerSeedHook"),
        ),
        custom_hooks=[
            dict(type="BackboneLoadCheckHook", weights_file=str(weights)),
            # dropout's generator, resumed with the checkpoint
            dict(type="TorchRngStateHook"),
        ],
        log_processor=dict(by_epoch=False),
        log_level="INFO",
        launcher="none",
    )


def train_and_evaluate(
    config, backbone: Backbone, weights: Path, num_classes: int
) -> dict[str, float]:
    """Train the segmentation task's `config` from the mmseg file `weights` with mmengine's Runner
    (resuming from work_dir's latest checkpoint) and return its validation metrics (mIoU, mAcc, aAcc
    in percent, IoU.<class>)."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    processes = init_distributed()  # here, not by mmengine: its launcher insists on a GPU
    distributed = processes.is_distributed
    gloo = config.device == "cpu" or not torch.cuda.is_available()
    register_modules()
    cfg = Config(
        model_config(config, backbone, weights, num_classes, distributed, processes.world_size)
    )
    # the process group exists already (common.distributed); mmengine then only wraps the model
    if distributed:
        cfg.launcher = "pytorch"
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if gloo:
        cfg.env_cfg.dist_cfg.backend = "gloo"
        if distributed:  # DDP over CPU modules takes no device_ids
            cfg.model_wrapper_cfg = dict(
                type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False
            )
    cfg.resume = True  # picks up the latest checkpoint in work_dir, if any
    work_dir = Path(cfg.work_dir)
    if processes.rank == 0:  # rank 0 alone writes checkpoints
        remove_partial_writes(work_dir, log)
    last = work_dir / "last_checkpoint"
    if last.exists():
        log.info("mmseg: resumes from %s", last.read_text().strip())
    with trusting(cfg.work_dir):
        runner = Runner.from_cfg(cfg)
        runner.train()
        metrics = runner.val()
    return {k: float(v) for k, v in metrics.items()}


def pretrained_resnet(
    arch: str, path: Path, canonical: dict[str, torch.Tensor]
) -> tuple[torch.nn.Module, list[str]]:
    """mmsegmentation's ResNet (torchvision-style stem) with
    init_cfg=Pretrained(prefix='backbone.').

    mmengine loads non-strictly and only logs mismatches, so every tensor of the built model is
    compared with the file: a key that is missing, or a value that was not loaded, is reported."""
    from mmengine.logging import MMLogger
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    register_resnet_table()
    MMLogger.get_current_instance().setLevel("WARNING")  # it logs a paragraph per loaded tensor
    model = MODELS.build(
        resnet_backbone(
            arch,
            out_indices=(0, 1, 2, 3),
            style="pytorch",
            init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="backbone."),
        )
    )
    model.init_weights()
    state = model.state_dict()
    problems = sorted(set(state) ^ set(canonical))
    problems += [
        k for k in set(state) & set(canonical) if not torch.equal(state[k].cpu(), canonical[k])
    ]
    model.eval()  # mmseg's ResNet.train() returns None, so no chaining
    return model, problems


def resnet_stages(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    stem = model.maxpool(model.relu(model.norm1(model.conv1(x))))
    return {"stem": stem, **{f"res{i + 2}": out for i, out in enumerate(model(x))}}
