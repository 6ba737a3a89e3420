"""Detection and instance segmentation transfer through detectron2's own trainer and COCOEvaluator.

The MoCo protocol (He et al. 2020, detection/configs): torchvision-style ResNet (STRIDE_IN_1X1 False), RGB input
with ImageNet mean / std in 0-255, BACKBONE.FREEZE_AT 0, SyncBN in the backbone and the heads (BN in a single
process); for R50-C4 the res5 box head gets an extra norm after res5 (Res5ROIHeadsExtraNorm).

The canonical backbone is written as a detectron2 .pkl in the run dir and loaded with DetectionCheckpointer's
matching heuristics. Loading must be complete: every key of the file must land in the model and every ResNet
parameter of the model must come from the file; anything else stops the run before training.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from pretrain.errors import UserError
from transfer.backbone import Backbone

log = logging.getLogger("transfer")
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}


@dataclass
class DetectionData:
    train_json: str = "runs/scenes/coco/annotations/instances_train.json"
    train_images: str = "runs/scenes/coco/train"
    test_json: str = "runs/scenes/coco/annotations/instances_val.json"
    test_images: str = "runs/scenes/coco/val"
    min_size_train: tuple = (96, 112, 128)
    max_size_train: int = 213
    min_size_test: int = 128
    max_size_test: int = 213
    num_workers: int = 1


@dataclass
class DetectionConfig:
    run_dir: str = "runs/detection"
    seed: int = 0
    base: str = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"  # a detectron2 model-zoo config
    data: DetectionData = field(default_factory=DetectionData)
    iterations: int = 300
    batch_size: int = 4                     # images per iteration, over all processes
    lr: float = 0.02
    weight_decay: float = 1e-4
    steps: tuple = (0.75, 0.92)             # lr x0.1 at these fractions
    warmup_iters: int = 50
    checkpoint_period: int = 100
    extra_norm_res5: bool = False           # MoCo's Res5ROIHeadsExtraNorm (R50-C4)
    opts: list = field(default_factory=list)  # any further detectron2 KEY VALUE pairs
    device: Optional[str] = None


def _import():
    from transfer.detectron2_compat import import_detectron2
    return import_detectron2()


def register_extra_norm_head() -> None:
    """Res5ROIHeads with a norm after res5, as in MoCo's detection/train_net.py."""
    _import()
    from detectron2.layers import get_norm
    from detectron2.modeling import ROI_HEADS_REGISTRY
    from detectron2.modeling.roi_heads import Res5ROIHeads
    if "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY:
        return

    @ROI_HEADS_REGISTRY.register()
    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        def _build_res5_block(self, cfg):
            seq, out_channels = super()._build_res5_block(cfg)
            norm = get_norm(cfg.MODEL.RESNETS.NORM, out_channels)
            seq.add_module("norm", norm)
            return seq, out_channels


def detectron2_cfg(config: DetectionConfig, backbone: Backbone, weights: Path, num_classes: int, distributed: bool):
    _import()
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    cfg = get_cfg()
    try:
        cfg.merge_from_file(model_zoo.get_config_file(config.base))
    except RuntimeError:
        raise UserError(f"'{config.base}' is not a detectron2 model-zoo config (base=...)") from None
    depth = DEPTHS[backbone.arch]
    norm = "SyncBN" if distributed else "BN"
    d = config.data
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() and config.device != "cpu" else "cpu"
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MASK_FORMAT = "bitmask"  # the scenes' masks are RLE (COCO 2017's polygons decode to bitmasks too)
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    if cfg.MODEL.FPN.IN_FEATURES:
        cfg.MODEL.FPN.NORM = norm
    cfg.MODEL.ROI_BOX_HEAD.NORM = norm
    cfg.MODEL.ROI_MASK_HEAD.NORM = norm if cfg.MODEL.MASK_ON else cfg.MODEL.ROI_MASK_HEAD.NORM
    if config.extra_norm_res5:
        register_extra_norm_head()
        cfg.MODEL.ROI_HEADS.NAME = "Res5ROIHeadsExtraNorm"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (f"{_name(config)}_train",), (f"{_name(config)}_test",)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = tuple(d.min_size_train), d.max_size_train
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = d.min_size_test, d.max_size_test
    cfg.DATALOADER.NUM_WORKERS = d.num_workers
    cfg.SOLVER.IMS_PER_BATCH = config.batch_size
    cfg.SOLVER.BASE_LR = config.lr
    cfg.SOLVER.WEIGHT_DECAY = config.weight_decay
    cfg.SOLVER.MAX_ITER = config.iterations
    cfg.SOLVER.STEPS = tuple(sorted({min(max(1, round(s * config.iterations)), config.iterations - 1)
                                     for s in config.steps}))  # detectron2 wants milestones < MAX_ITER
    cfg.SOLVER.WARMUP_ITERS = min(config.warmup_iters, config.iterations)
    cfg.SOLVER.CHECKPOINT_PERIOD = config.checkpoint_period
    cfg.TEST.EVAL_PERIOD = 0
    cfg.SEED = config.seed
    cfg.OUTPUT_DIR = str(Path(config.run_dir) / "detectron2")
    if config.opts:
        cfg.merge_from_list(list(config.opts))
    return cfg


def _name(config: DetectionConfig) -> str:
    import hashlib  # a stable name (str hash() changes per process)
    return "ssl_hsic_" + hashlib.sha1(os.path.abspath(config.data.train_json).encode()).hexdigest()[:12]


def register_datasets(config: DetectionConfig) -> int:
    """Register the COCO-format train / test sets with detectron2; return the number of classes."""
    import json
    _import()
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances
    d = config.data
    for path in (d.train_json, d.train_images, d.test_json, d.test_images):
        if not Path(path).exists():
            raise UserError(f"detection data incomplete: {path} does not exist; generate scenes with `python -m "
                            "transfer scenes --out DIR` or point data.* at COCO 2017 / VOC in COCO format")
    for split, (json_file, images) in {"train": (d.train_json, d.train_images),
                                       "test": (d.test_json, d.test_images)}.items():
        name = f"{_name(config)}_{split}"
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, json_file, images)
    return len(json.loads(Path(d.train_json).read_text())["categories"])


def is_backbone_key(name: str) -> bool:
    """A model parameter / buffer that belongs to the ResNet (including res5 inside a C4 box head)."""
    return (".bottom_up." in f".{name}" or name.startswith("backbone.res") or name.startswith("backbone.stem")
            or name.startswith("roi_heads.res5.")) and not name.startswith("roi_heads.res5.norm")


def load_backbone_strictly(model, weights: Path) -> None:
    """Load the .pkl with detectron2's heuristics; refuse unmatched file keys or ResNet keys left unloaded."""
    _import()
    from detectron2.checkpoint import DetectionCheckpointer
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(weights)))
    unmatched = sorted(incompatible.unexpected_keys) + [k for k, *_ in incompatible.incorrect_shapes]
    not_loaded = sorted(k for k in incompatible.missing_keys if is_backbone_key(k))
    if unmatched or not_loaded:
        raise UserError(f"the backbone in {weights} does not fit the detectron2 model: {len(unmatched)} unmatched "
                        f"keys ({', '.join(unmatched[:4])}), {len(not_loaded)} backbone weights not loaded "
                        f"({', '.join(not_loaded[:4])}); check the architecture")


def build_trainer(cfg):
    _import()
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator
    from transfer.detectron2_compat import has_compiled_ops

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            # The Python COCO evaluation when detectron2._C (its fast C++ evaluator) is absent.
            return COCOEvaluator(dataset_name, output_dir=os.path.join(cfg.OUTPUT_DIR, "eval"),
                                 use_fast_impl=has_compiled_ops())
    return Trainer(cfg)


def init_distributed_for_detectron2() -> bool:
    """Under SLURM / torchrun with several tasks: the process group, and detectron2's per-machine group."""
    from slurm.distributed import detect, init_distributed
    info = detect()
    if not info.is_distributed:
        return False
    import torch.distributed as dist
    _import()
    from detectron2.utils import comm
    init_distributed()
    per_machine = int(os.environ.get("SLURM_NTASKS_PER_NODE", os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
    for machine in range(info.world_size // per_machine):
        ranks = list(range(machine * per_machine, (machine + 1) * per_machine))
        group = dist.new_group(ranks)
        if info.rank in ranks:
            comm._LOCAL_PROCESS_GROUP = group
    return True


def run_detection(config: DetectionConfig, backbone: Backbone, run_dir: Path) -> dict[str, float]:
    """Train and evaluate; return bbox AP / AP50 / AP75 (and segm AP... for Mask R-CNN), in percent."""
    import math
    from transfer import export
    distributed = init_distributed_for_detectron2()
    num_classes = register_datasets(config)
    weights = export.write(backbone, "detectron2", run_dir / "backbone.pkl")
    cfg = detectron2_cfg(config, backbone, weights, num_classes, distributed)
    Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
    from detectron2.utils.logger import setup_logger
    setup_logger(output=cfg.OUTPUT_DIR, name="detectron2", distributed_rank=int(os.environ.get("RANK", 0)))
    setup_logger(output=cfg.OUTPUT_DIR, name="fvcore", distributed_rank=int(os.environ.get("RANK", 0)))
    from detectron2.utils.env import seed_all_rng
    seed_all_rng(cfg.SEED + int(os.environ.get("RANK", 0)))  # as default_setup: the heads' init, the data order
    trainer = build_trainer(cfg)
    if trainer.checkpointer.has_checkpoint():
        trainer.resume_or_load(resume=True)  # our own checkpoint in the run dir
    else:
        load_backbone_strictly(trainer.model.module if distributed else trainer.model, weights)
    trainer.train()
    evaluators = [trainer.build_evaluator(cfg, cfg.DATASETS.TEST[0])]
    results = trainer.test(cfg, trainer.model, evaluators)
    metrics = {}
    for task in ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",):
        values = results.get(task) or {}
        if not values:  # COCOEvaluator returns nothing when the model detects nothing: AP is 0 then
            log.warning("detection: no %s predictions above the score threshold; AP = 0", task)
            values = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        for key, value in values.items():
            if "-" not in key and not math.isnan(value):  # the summary, not per-class APs
                metrics[f"{task}.{key}"] = float(value)
    return metrics
