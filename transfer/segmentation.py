"""Semantic segmentation transfer through mmsegmentation's own Runner, datasets and IoUMetric.

The protocol (BYOL appendix D.4): an FCN on the backbone with conv5 dilated (stride 1, dilation 2); the head
is 2 x [3x3 conv 256, dilation 6, BN, ReLU] + a 1x1 classifier; random scale 0.5-2, crop, flip; SGD with
momentum 0.9, weight decay 1e-4, lr x0.1 at 70% and 90% of the iterations; mIoU on the validation split.
mmsegmentation's `ResNet` is used with its torchvision-style stem (conv1 7x7), not the deep-stem ResNetV1c.

The backbone comes from the canonical weights through the mmseg export (transfer.export) and init_cfg=
Pretrained. mmengine loads non-strictly and only logs mismatches, so a hook compares every backbone tensor of
the built model with the file before the first iteration and stops the run on any difference.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from pretrain.errors import UserError
from transfer.backbone import Backbone

log = logging.getLogger("transfer")
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}


@dataclass
class SegmentationData:
    dataset: str = "scenes"                 # scenes (transfer scenes' VOC folder) | voc (PASCAL VOC 2012 + aug)
    root: str = "runs/scenes/voc/VOC2012"   # the folder holding JPEGImages/
    train_list: str = "ImageSets/Segmentation/train.txt"
    val_list: str = "ImageSets/Segmentation/val.txt"
    train_labels: str = "SegmentationClass"  # VOC aug: SegmentationClassAug
    val_labels: str = "SegmentationClass"
    scale: tuple[int, int] = (128, 128)     # (w, h) before the 0.5-2 random rescale
    crop: tuple[int, int] = (96, 96)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    num_workers: int = 2


@dataclass
class SegmentationSchedule:
    iterations: int = 300
    batch_size: int = 8                     # per GPU
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[float, float] = (0.7, 0.9)
    log_interval: int = 50
    checkpoint_interval: int = 100


@dataclass
class SegmentationConfig:
    run_dir: str = "runs/segmentation"
    seed: int = 0
    data: SegmentationData = field(default_factory=SegmentationData)
    schedule: SegmentationSchedule = field(default_factory=SegmentationSchedule)
    head_channels: int = 256
    dropout: float = 0.1
    sync_bn: bool = True                    # SyncBN when distributed
    device: Optional[str] = None


def _dataset(c: SegmentationData, split: str, pipeline: list) -> dict:
    kind = {"scenes": "GeneratedScenesDataset", "voc": "PascalVOCDataset"}.get(c.dataset)
    if kind is None:
        raise UserError(f"unknown segmentation dataset '{c.dataset}'; choose scenes or voc (data.dataset)")
    listing, labels = (c.train_list, c.train_labels) if split == "train" else (c.val_list, c.val_labels)
    root = Path(c.root)
    for needed in (root / "JPEGImages", root / listing, root / labels):
        if not needed.exists():
            raise UserError(f"segmentation data incomplete: {needed} does not exist (data.root={c.root}); generate "
                            "scenes with `python -m transfer scenes --out DIR` or point data.root at VOC2012")
    return dict(type=kind, data_root=str(root), ann_file=listing,
                data_prefix=dict(img_path="JPEGImages", seg_map_path=labels), pipeline=pipeline)


def mmseg_config(config: SegmentationConfig, backbone: Backbone, weights_file: Path, num_classes: int,
                 distributed: bool) -> dict:
    """The complete mmengine config of this protocol, as a plain dict."""
    d, s = config.data, config.schedule
    norm = dict(type="SyncBN" if distributed and config.sync_bn else "BN", requires_grad=True)
    width = 512 if DEPTHS[backbone.arch] < 50 else 2048
    train_pipeline = [
        dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"),
        dict(type="RandomResize", scale=tuple(d.scale), ratio_range=tuple(d.ratio_range), keep_ratio=True),
        dict(type="RandomCrop", crop_size=tuple(d.crop[::-1]), cat_max_ratio=0.75),
        dict(type="RandomFlip", prob=0.5), dict(type="PackSegInputs")]
    test_pipeline = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=tuple(d.scale), keep_ratio=True),
                     dict(type="LoadAnnotations"), dict(type="PackSegInputs")]
    return dict(
        default_scope="mmseg",
        work_dir=str(Path(config.run_dir) / "mmseg"),
        randomness=dict(seed=config.seed),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl" if torch.cuda.is_available() else "gloo")),
        model=dict(
            type="EncoderDecoder",
            data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53],
                                   std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0, seg_pad_val=255,
                                   size=tuple(d.crop[::-1])),
            backbone=dict(type="ResNet", depth=DEPTHS[backbone.arch], num_stages=4, out_indices=(3,),
                          strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), norm_cfg=norm, norm_eval=False,
                          style="pytorch", contract_dilation=False,
                          init_cfg=dict(type="Pretrained", checkpoint=str(weights_file), prefix="backbone.")),
            decode_head=dict(type="FCNHead", in_channels=width, in_index=0, channels=config.head_channels,
                             num_convs=2, kernel_size=3, dilation=6, concat_input=False,
                             dropout_ratio=config.dropout, num_classes=num_classes, norm_cfg=norm,
                             align_corners=False,
                             loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0,
                                              avg_non_ignore=True)),
            train_cfg=dict(), test_cfg=dict(mode="whole")),
        train_dataloader=dict(batch_size=s.batch_size, num_workers=d.num_workers,
                              persistent_workers=d.num_workers > 0, sampler=dict(type="InfiniteSampler", shuffle=True),
                              dataset=_dataset(d, "train", train_pipeline)),
        val_dataloader=dict(batch_size=1, num_workers=d.num_workers, persistent_workers=False,
                            sampler=dict(type="DefaultSampler", shuffle=False),
                            dataset=_dataset(d, "val", test_pipeline)),
        val_evaluator=dict(type="PerClassIoUMetric", iou_metrics=["mIoU"]),
        optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=s.lr, momentum=s.momentum,
                                                               weight_decay=s.weight_decay)),
        param_scheduler=[dict(type="MultiStepLR", by_epoch=False, begin=0, end=s.iterations, gamma=0.1,
                              milestones=[round(m * s.iterations) for m in s.milestones])],
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=s.iterations, val_interval=s.iterations + 1),
        val_cfg=dict(type="ValLoop"),
        default_hooks=dict(timer=dict(type="IterTimerHook"),
                           logger=dict(type="LoggerHook", interval=s.log_interval, log_metric_by_epoch=False),
                           param_scheduler=dict(type="ParamSchedulerHook"),
                           checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=s.checkpoint_interval,
                                           max_keep_ckpts=1),
                           sampler_seed=dict(type="DistSamplerSeedHook")),
        custom_hooks=[dict(type="BackboneLoadCheckHook", weights_file=str(weights_file))],
        log_processor=dict(by_epoch=False),
        log_level="INFO",
        launcher="none",
    )


def register_modules() -> None:
    """mmseg's registry, the scenes dataset, the per-class IoU metric and the weight-check hook."""
    import numpy as np
    from mmengine.hooks import Hook
    from mmseg.evaluation import IoUMetric
    from mmseg.registry import HOOKS, METRICS
    from mmseg.utils import register_all_modules
    register_all_modules()
    import transfer.mmseg_scenes  # noqa: F401  (registers GeneratedScenesDataset)

    @METRICS.register_module(force=True)
    class PerClassIoUMetric(IoUMetric):
        """IoUMetric's aAcc / mIoU / mAcc plus IoU.<class> for each class seen in the labels or predictions."""

        def compute_metrics(self, results: list) -> dict:
            metrics = super().compute_metrics(results)
            areas = [sum(column) for column in zip(*results)]
            per_class = self.total_area_to_metrics(*areas, ["mIoU"], self.nan_to_num, self.beta)["IoU"]
            for name, value in zip(self.dataset_meta["classes"], per_class):
                if not np.isnan(value):
                    metrics[f"IoU.{name}"] = round(float(value) * 100, 2)
            return metrics

    @HOOKS.register_module(force=True)
    class BackboneLoadCheckHook(Hook):
        """Before the first iteration: every backbone tensor must equal the file's (mmengine loads non-strictly)."""

        def __init__(self, weights_file: str):
            self.weights_file = weights_file

        def before_train(self, runner) -> None:
            if runner.iter > 0:  # resumed: the weights come from mmseg's own checkpoint
                return
            expected = torch.load(self.weights_file, map_location="cpu", weights_only=True)["state_dict"]
            model = runner.model.module if hasattr(runner.model, "module") else runner.model
            state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
            missing = sorted(set(state) - set(expected))
            unused = sorted(set(expected) - set(state))
            differ = sorted(k for k in set(state) & set(expected) if not torch.equal(state[k].cpu(), expected[k]))
            if missing or unused or differ:
                raise UserError(f"the backbone did not load in full from {self.weights_file}: not in the file "
                                f"{len(missing)} {missing[:4]}, not used {len(unused)} {unused[:4]}, not loaded "
                                f"{len(differ)} {differ[:4]}")


def run_segmentation(config: SegmentationConfig, backbone: Backbone, run_dir: Path) -> dict[str, float]:
    """Train and evaluate; return mmseg's metrics (mIoU, mAcc, aAcc in percent, IoU.<class>)."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    from transfer import export
    from transfer.scenes import CLASSES
    register_modules()
    from slurm.distributed import detect
    distributed = detect().is_distributed
    weights_file = export.write(backbone, "mmseg", run_dir / "backbone.mmseg.pth")
    num_classes = len(CLASSES) if config.data.dataset == "scenes" else 21
    cfg = Config(mmseg_config(config, backbone, weights_file, num_classes, distributed))
    if distributed:
        cfg.launcher = "slurm" if "SLURM_PROCID" in __import__("os").environ else "pytorch"
    if config.device == "cpu" or not torch.cuda.is_available():
        cfg.env_cfg.dist_cfg.backend = "gloo"
    cfg.resume = True  # picks up the latest checkpoint in work_dir, if any
    from transfer.mmengine_compat import trusting
    with trusting(cfg.work_dir):
        runner = Runner.from_cfg(cfg)
        runner.train()
        metrics = runner.val()
    return {k: float(v) for k, v in metrics.items()}
