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
* `train_and_evaluate(cfg)`: mmengine's Runner on a complete config dict (the protocol is built by
  the segmentation task), resuming from work_dir's last checkpoint (logged), then its validation
  loop.
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

from common.errors import UserError
from pretrain.networks import ARCHITECTURES, architecture

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


def train_and_evaluate(cfg_dict: dict, distributed: bool, gloo: bool) -> dict[str, float]:
    """Train with mmengine's Runner (resuming from work_dir's latest checkpoint) and return its
    validation metrics."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    register_modules()
    cfg = Config(cfg_dict)
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
    from common.distributed import detect

    if detect().rank == 0:  # rank 0 alone writes checkpoints
        from common.files import remove_partial_writes

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
