"""All of this project's detectron2 glue, in one place; detectron2 is imported inside the functions.

* Import with shims (`import_detectron2`): detectron2 v0.6 on today's stack needs a stand-in for its
  compiled ops when built without them, Pillow's Image.LINEAR and numpy's removed aliases. Each shim
  is applied only when the installed detectron2 needs it, so an upstream build from source (the
  normal install on a cluster) runs untouched.
* `model_config(config, backbone, weights, num_classes, distributed)`: the detection protocol's
  complete detectron2 config (a CfgNode), built from the task's config; `register_datasets` its
  datasets (refusing missing files: the task's prepare calls it).
* `train_and_evaluate(config, backbone, weights, num_classes)`: detectron2's trainer on that config
  with COCOEvaluator (or PascalVOCDetectionEvaluator), resuming from the run's own checkpoint, on
  detectron2's per-machine process group; and MoCo's Res5ROIHeadsExtraNorm head.
* Strict loading of an exported .pkl (`load_weights` is the one call of DetectionCheckpointer's
  private loader; `load_backbone_strictly` refuses anything that did not load) and detectron2's
  plain ResNet backbone (`pretrained_resnet`, for verification).
* The architecture table's widths and depths (`configure_resnet`): MODEL.RESNETS.STEM_OUT_CHANNELS,
  RES2_OUT_CHANNELS and WIDTH_PER_GROUP from the table's channel counts (the C4 box head,
  Res5ROIHeads, reads the same keys), and for a depth detectron2's build_resnet_backbone has no row
  for (ResNet-200) backbone builders registered in its BACKBONE_REGISTRY that take the blocks per
  stage from the table (`register_table_backbones`).

The MoCo protocol (He et al. 2020, detection/configs): torchvision-style ResNet (STRIDE_IN_1X1
False), RGB input with ImageNet mean / std in 0-255, BACKBONE.FREEZE_AT 0, SyncBN in the backbone
and the heads (BN in a single process); for R50-C4 the res5 box head gets an extra norm after res5
(Res5ROIHeadsExtraNorm)."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
from pathlib import Path

import torch

from common.errors import UserError
from pretrain.networks import ARCHITECTURES, architecture

log = logging.getLogger("transfer")

# ------------------------------------------------------------------------------ import and shims

_applied: list[str] | None = None
_has_compiled_ops: bool | None = None


class _MissingCompiledOps(types.ModuleType):
    """Stands in for detectron2._C when detectron2 was built without its C++/CUDA extension.

    v0.6 imports _C at module level in layers/deform_conv.py and rotated_boxes.py, so without it
    nothing in detectron2.layers imports, although Faster / Mask R-CNN never call it (they run on
    torchvision ops). Any use says what is missing; hasattr() sees no attribute, so feature checks
    fall back cleanly."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"detectron2._C.{name} is unavailable: this detectron2 was built without its C++ ops "
            "(deformable conv, rotated boxes, fast COCO eval); build detectron2 "
            "from source for them"
        )


def _detectron2_version() -> str:
    spec = importlib.util.find_spec("detectron2")
    if spec is None:
        raise UserError(
            "detectron2 is not installed: run scripts/install.sh (or build detectron2 from source)"
        )
    with open(spec.submodule_search_locations[0] + "/__init__.py") as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip("'\"")
    return "unknown"


def apply_shims() -> list[str]:
    """Patch what detectron2 <= 0.6 needs from older Pillow / numpy; return the names of the
    shims applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = []
    global _has_compiled_ops
    _has_compiled_ops = importlib.util.find_spec("detectron2._C") is not None
    if not _has_compiled_ops:
        sys.modules["detectron2._C"] = _MissingCompiledOps("detectron2._C")
        _applied.append("detectron2._C")
    if _detectron2_version() != "0.6":
        return _applied
    import numpy as np
    from PIL import Image

    # v0.6's data/transforms/transform.py uses Image.LINEAR as a default argument, so importing it
    # fails on Pillow >= 10, which removed the alias. Upstream detectron2 uses Image.BILINEAR since
    # 2023.
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR
        _applied.append("PIL.Image.LINEAR")
    # v0.6 uses np.int / np.float / np.bool / np.str (data/build.py, evaluation/*,
    # structures/masks.py, data/datasets/pascal_voc.py), aliases that numpy 1.24 removed. Upstream
    # replaced them with the builtins.
    for alias, builtin in (("int", int), ("float", float), ("bool", bool), ("str", str)):
        if alias not in np.__dict__:
            setattr(np, alias, builtin)
            _applied.append(f"numpy.{alias}")
    if _applied:
        log.debug("detectron2 %s: applied compatibility shims %s", _detectron2_version(), _applied)
    return _applied


def has_compiled_ops() -> bool:
    """True when detectron2._C (its C++/CUDA extension) was built."""
    apply_shims()
    return bool(_has_compiled_ops)


def import_detectron2():
    """Apply the shims if needed, then import and return the detectron2 package."""
    apply_shims()
    import detectron2

    return detectron2


# ------------------------------------------------------------------------------ the architecture
# table

# The depths detectron2 0.6's build_resnet_backbone knows (its num_blocks_per_stage literal,
# detectron2/modeling/backbone/resnet.py); another depth of the table is built by the registered
# builders below.
DETECTRON2_DEPTHS = (18, 34, 50, 101, 152)
# detectron2's ResNet backbone builders -> ours, which build the same networks for every depth of
# the table
TABLE_BUILDERS = {
    "build_resnet_backbone": "build_resnet_table_backbone",
    "build_resnet_fpn_backbone": "build_resnet_table_fpn_backbone",
    "build_retinanet_resnet_fpn_backbone": "build_retinanet_resnet_table_fpn_backbone",
}


def resnet_settings(arch: str) -> dict[str, int]:
    """cfg.MODEL.RESNETS for an architecture of the table: detectron2's bottleneck in stage i
    (res2..res5) is NUM_GROUPS * WIDTH_PER_GROUP * 2^i wide with RES2_OUT_CHANNELS * 2^i outputs,
    after a stem of
    STEM_OUT_CHANNELS; so width w gives 64 w, 64 w * 2^i and 256 w * 2^i, as the table (basic
    blocks: 64 w * 2^i)."""
    spec = architecture(arch)
    return {
        "DEPTH": spec.depth,
        "STEM_OUT_CHANNELS": spec.stem_channels,
        "RES2_OUT_CHANNELS": spec.stage_channels[0],
        "NUM_GROUPS": 1,
        "WIDTH_PER_GROUP": 64 * spec.width,
    }


def configure_resnet(cfg, arch: str) -> None:
    """Set cfg.MODEL.RESNETS for `arch` (resnet_settings); for a depth detectron2's
    build_resnet_backbone lacks,
    switch MODEL.BACKBONE.NAME to the registered builder of the same kind (plain / C4, FPN,
    RetinaNet FPN)."""
    for key, value in resnet_settings(arch).items():
        setattr(cfg.MODEL.RESNETS, key, value)
    if architecture(arch).depth in DETECTRON2_DEPTHS:
        return
    register_table_backbones()
    name = cfg.MODEL.BACKBONE.NAME
    if name in TABLE_BUILDERS.values():
        return
    if name not in TABLE_BUILDERS:
        raise UserError(
            f"{arch} (depth {architecture(arch).depth}) is built only through this project's "
            f"ResNet "
            f"builders ({', '.join(TABLE_BUILDERS)}); the config's MODEL.BACKBONE.NAME "
            f"is {name}"
        )
    cfg.MODEL.BACKBONE.NAME = TABLE_BUILDERS[name]


def blocks_per_stage(depth: int) -> tuple[str, tuple[int, ...]]:
    """The block type and blocks per stage of the table's ResNets of this depth (every width has
    the same)."""
    found = {(a.block, a.layers) for a in ARCHITECTURES.values() if a.depth == depth}
    if len(found) != 1:
        raise UserError(
            f"MODEL.RESNETS.DEPTH {depth} is no ResNet of the table "
            f"({', '.join(sorted({str(a.depth) for a in ARCHITECTURES.values()}, key=int))})"
        )
    return found.pop()


def register_table_backbones() -> None:
    """Register build_resnet_table_backbone (plain, and the C4 trunk: Res5ROIHeads builds res5
    itself from MODEL.RESNETS), build_resnet_table_fpn_backbone and
    build_retinanet_resnet_table_fpn_backbone in detectron2's BACKBONE_REGISTRY: detectron2 0.6's
    builders with the blocks per stage taken from the architecture table, so
    that every depth of the table (ResNet-200) builds. Same modules, names and settings as
    detectron2's."""
    import_detectron2()
    from detectron2.modeling import BACKBONE_REGISTRY

    if "build_resnet_table_backbone" in BACKBONE_REGISTRY:
        return
    from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
    from detectron2.modeling.backbone.resnet import (
        BasicBlock,
        BasicStem,
        BottleneckBlock,
        DeformBottleneckBlock,
        ResNet,
    )

    @BACKBONE_REGISTRY.register()
    def build_resnet_table_backbone(cfg, input_shape):
        """detectron2 0.6's build_resnet_backbone (modeling/backbone/resnet.py), blocks per stage
        from the table."""
        r = cfg.MODEL.RESNETS
        block, layers = blocks_per_stage(r.DEPTH)
        stem = BasicStem(
            in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM
        )
        bottleneck_channels = r.NUM_GROUPS * r.WIDTH_PER_GROUP
        in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
        assert r.RES5_DILATION in {1, 2}, f"res5_dilation cannot be {r.RES5_DILATION}."
        if block == "basic":
            assert not any(r.DEFORM_ON_PER_STAGE) and r.RES5_DILATION == 1 and r.NUM_GROUPS == 1, (
                "basic-block ResNets take no deformable conv, res5 dilation or groups"
            )
        stages = []
        for idx, stage_idx in enumerate(range(2, 6)):
            dilation = r.RES5_DILATION if stage_idx == 5 else 1
            first_stride = 1 if idx == 0 or (stage_idx == 5 and dilation == 2) else 2
            kwargs = {
                "num_blocks": layers[idx],
                "stride_per_block": [first_stride] + [1] * (layers[idx] - 1),
                "in_channels": in_channels,
                "out_channels": out_channels,
                "norm": r.NORM,
            }
            if block == "basic":
                kwargs["block_class"] = BasicBlock
            else:
                kwargs.update(
                    bottleneck_channels=bottleneck_channels,
                    stride_in_1x1=r.STRIDE_IN_1X1,
                    dilation=dilation,
                    num_groups=r.NUM_GROUPS,
                )
                if r.DEFORM_ON_PER_STAGE[idx]:
                    kwargs.update(
                        block_class=DeformBottleneckBlock,
                        deform_modulated=r.DEFORM_MODULATED,
                        deform_num_groups=r.DEFORM_NUM_GROUPS,
                    )
                else:
                    kwargs["block_class"] = BottleneckBlock
            stages.append(ResNet.make_stage(**kwargs))
            in_channels, out_channels, bottleneck_channels = (
                out_channels,
                out_channels * 2,
                bottleneck_channels * 2,
            )
        return ResNet(
            stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT
        )

    @BACKBONE_REGISTRY.register()
    def build_resnet_table_fpn_backbone(cfg, input_shape):
        """detectron2 0.6's build_resnet_fpn_backbone (modeling/backbone/fpn.py) on the table's
        ResNet."""
        return FPN(
            bottom_up=build_resnet_table_backbone(cfg, input_shape),
            in_features=cfg.MODEL.FPN.IN_FEATURES,
            out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
            norm=cfg.MODEL.FPN.NORM,
            top_block=LastLevelMaxPool(),
            fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        )

    @BACKBONE_REGISTRY.register()
    def build_retinanet_resnet_table_fpn_backbone(cfg, input_shape):
        """detectron2 0.6's build_retinanet_resnet_fpn_backbone (modeling/backbone/fpn.py) on the
        table's ResNet."""
        bottom_up = build_resnet_table_backbone(cfg, input_shape)
        out_channels = cfg.MODEL.FPN.OUT_CHANNELS
        return FPN(
            bottom_up=bottom_up,
            in_features=cfg.MODEL.FPN.IN_FEATURES,
            out_channels=out_channels,
            norm=cfg.MODEL.FPN.NORM,
            top_block=LastLevelP6P7(bottom_up.output_shape()["res5"].channels, out_channels),
            fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        )


# ------------------------------------------------------------------------------ the protocol's
# model


def register_extra_norm_head() -> None:
    """Res5ROIHeads with a norm (of MODEL.RESNETS.NORM) after res5, as in MoCo's
    detection/train_net.py:23-34
    (since facebookresearch/moco 87e36d3, which stopped overriding detectron2's private
    _build_res5_block)."""
    import_detectron2()
    from detectron2.layers import get_norm
    from detectron2.modeling import ROI_HEADS_REGISTRY
    from detectron2.modeling.roi_heads import Res5ROIHeads

    if "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY:
        return

    @ROI_HEADS_REGISTRY.register()
    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """As described in the MoCo paper, an extra BN layer follows the res5 stage."""

        def __init__(self, cfg, input_shape):
            super().__init__(cfg, input_shape)
            self.res5.add_module(
                "norm", get_norm(cfg.MODEL.RESNETS.NORM, self.res5[-1].out_channels)
            )


def model_config(config, backbone, weights: Path, num_classes: int, distributed: bool):
    """The complete detectron2 config (a CfgNode) of the detection task's `config`
    (transfer.tasks.detection) on `backbone`'s architecture, loading the detectron2 .pkl `weights`,
    with `num_classes` classes (register_datasets counts them)."""
    import_detectron2()
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    try:
        cfg.merge_from_file(model_zoo.get_config_file(config.base))
    except RuntimeError:
        raise UserError(
            f"'{config.base}' is not a detectron2 model-zoo config (base=...)"
        ) from None
    on_gpu = torch.cuda.is_available() and config.device != "cpu"
    # torch's SyncBN refuses CPU tensors; naiveSyncBN (all_reduce of the per-rank moments) runs
    # anywhere
    norm = (
        ("naiveSyncBN" if config.norm == "naiveSyncBN" or not on_gpu else "SyncBN")
        if distributed
        else "BN"
    )
    d = config.data
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() and config.device != "cpu" else "cpu"
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    cfg.INPUT.FORMAT = "RGB"
    # the scenes' masks are RLE (COCO 2017's polygons decode to bitmasks too)
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    if cfg.MODEL.FPN.IN_FEATURES:  # FPN: the conv box / mask heads are normalised too
        cfg.MODEL.FPN.NORM = norm
        cfg.MODEL.ROI_BOX_HEAD.NORM = norm
        cfg.MODEL.ROI_MASK_HEAD.NORM = norm if cfg.MODEL.MASK_ON else cfg.MODEL.ROI_MASK_HEAD.NORM
    # C4: the box head is res5 (normalised by RESNETS.NORM); MoCo's Base-RCNN-C4-BN.yaml leaves the
    # ROI box / mask head NORM at detectron2's "" (config/defaults.py), which Res5ROIHeads does not
    # read
    if config.extra_norm_res5:
        register_extra_norm_head()
        cfg.MODEL.ROI_HEADS.NAME = "Res5ROIHeadsExtraNorm"
    if (
        cfg.MODEL.ROI_HEADS.NAME.startswith("Res5ROIHeads")
        and architecture(backbone.arch).block == "basic"
    ):
        raise UserError(
            f"{config.base} is a C4 model: detectron2 builds its res5 box head of bottleneck "
            f"blocks "
            f"(Res5ROIHeads), which {backbone.arch}'s basic blocks cannot load; use a "
            f"ResNet-50 or deeper"
        )
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = dataset_names(config)
    cfg.TEST.PRECISE_BN.ENABLED = bool(config.precise_bn)
    cfg.TEST.PRECISE_BN.NUM_ITER = config.precise_bn_iters
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = tuple(d.min_size_train), d.max_size_train
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = d.min_size_test, d.max_size_test
    cfg.DATALOADER.NUM_WORKERS = d.num_workers
    cfg.SOLVER.IMS_PER_BATCH = config.batch_size
    cfg.SOLVER.BASE_LR = config.lr
    cfg.SOLVER.WEIGHT_DECAY = config.weight_decay
    cfg.SOLVER.MAX_ITER = config.iterations
    cfg.SOLVER.STEPS = tuple(
        sorted(
            {
                min(max(1, round(s * config.iterations)), config.iterations - 1)
                # detectron2 wants milestones < MAX_ITER
                for s in config.steps
            }
        )
    )
    cfg.SOLVER.WARMUP_ITERS = min(config.warmup_iters, config.iterations)
    cfg.SOLVER.CHECKPOINT_PERIOD = config.checkpoint_period
    cfg.TEST.EVAL_PERIOD = 0
    cfg.SEED = config.seed
    cfg.OUTPUT_DIR = str(Path(config.run_dir) / "detectron2")
    if config.opts:
        cfg.merge_from_list(list(config.opts))
    # the architecture's depth and channel counts last (config.opts could not change the backbone's
    # shape), with the table's builder where detectron2's has no row for the depth
    configure_resnet(cfg, backbone.arch)
    return cfg


def _name(config) -> str:
    import hashlib  # a stable name (str hash() changes per process)

    d = config.data
    source = d.voc_root if d.format == "voc" else d.train_json
    return "ssl_hsic_" + hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:12]


def dataset_names(config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """detectron2's names of the training sets and of the test set."""
    d = config.data
    if d.format == "voc":
        return (
            tuple(f"{_name(config)}_{s.replace('/', '_')}" for s in d.voc_train),
            (f"{_name(config)}_{d.voc_test.replace('/', '_')}",),
        )
    return (f"{_name(config)}_train",), (f"{_name(config)}_test",)


def voc_year(folder: str) -> int:
    """VOC2007 -> 2007 (the year decides the metric: VOC07's 11-point AP for 2007, the area under
    the curve for
    2012, the only two detectron2's evaluator knows)."""
    return 2007 if "2007" in Path(folder).name else 2012


def register_voc(config) -> int:
    """Register each <year folder>/<image set> of data.voc_root with detectron2's own Pascal VOC
    loader (XML,
    1-based boxes made 0-based, `difficult` kept for training as detectron2 does); return the class
    count."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets.pascal_voc import CLASS_NAMES, register_pascal_voc

    d = config.data
    classes = list(d.class_names) or list(CLASS_NAMES)
    names = dataset_names(config)
    for name, entry in zip((*names[0], *names[1]), (*d.voc_train, *(d.voc_test,))):
        folder, _, image_set = entry.rpartition("/")
        root = Path(d.voc_root) / folder
        expected = [
            root / "Annotations",
            root / "JPEGImages",
            root / "ImageSets" / "Main" / f"{image_set}.txt",
        ]
        missing = [str(p) for p in expected if not p.exists()]
        if not folder or missing:
            raise UserError(
                f"VOC set '{entry}' not found under data.voc_root={d.voc_root}: expected "
                f"{', '.join(str(p) for p in expected)} (missing "
                f"{', '.join(missing) or 'the year folder'})"
            )
        if name not in DatasetCatalog.list():
            register_pascal_voc(name, str(root), image_set, voc_year(folder), classes)
            MetadataCatalog.get(name).evaluator_type = "pascal_voc"
    return len(classes)


def register_datasets(config) -> int:
    """Register the train / test sets (COCO JSON, or the VOC layout) with detectron2; return the
    class count."""
    import json

    import_detectron2()
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    d = config.data
    if d.format == "voc":
        return register_voc(config)
    for path in (d.train_json, d.train_images, d.test_json, d.test_images):
        if not Path(path).exists():
            raise UserError(
                f"detection data incomplete: {path} does not exist; generate scenes with `python "
                f"-m "
                "transfer scenes --out DIR` or point data.* at COCO 2017 / VOC in COCO "
                "format"
            )
    for split, (json_file, images) in {
        "train": (d.train_json, d.train_images),
        "test": (d.test_json, d.test_images),
    }.items():
        name = f"{_name(config)}_{split}"  # as dataset_names
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, json_file, images)
    return len(json.loads(Path(d.train_json).read_text())["categories"])


def is_backbone_key(name: str) -> bool:
    """A model parameter / buffer that belongs to the ResNet (including res5 inside a C4 box
    head)."""
    return (
        ".bottom_up." in f".{name}"
        or name.startswith("backbone.res")
        or name.startswith("backbone.stem")
        or name.startswith("roi_heads.res5.")
    ) and not name.startswith("roi_heads.res5.norm")


def load_backbone_strictly(model, weights: Path) -> None:
    """Load the .pkl with detectron2's heuristics; refuse unmatched file keys or ResNet keys left
    unloaded."""
    incompatible = load_weights(model, weights)
    unmatched = sorted(incompatible.unexpected_keys) + [
        k for k, *_ in incompatible.incorrect_shapes
    ]
    not_loaded = sorted(k for k in incompatible.missing_keys if is_backbone_key(k))
    if unmatched or not_loaded:
        raise UserError(
            f"the backbone in {weights} does not fit the detectron2 model: {len(unmatched)} "
            f"unmatched "
            f"keys ({', '.join(unmatched[:4])}), {len(not_loaded)} backbone weights "
            f"not loaded "
            f"({', '.join(not_loaded[:4])}); check the architecture"
        )


def build_trainer(cfg):
    import_detectron2()
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            from detectron2.data import MetadataCatalog

            if MetadataCatalog.get(dataset_name).get("evaluator_type") == "pascal_voc":
                return PascalVOCDetectionEvaluator(dataset_name)
            # The Python COCO evaluation when detectron2._C (its fast C++ evaluator) is absent.
            return COCOEvaluator(
                dataset_name,
                output_dir=os.path.join(cfg.OUTPUT_DIR, "eval"),
                use_fast_impl=has_compiled_ops(),
            )

    return Trainer(cfg)


def init_distributed_for_detectron2() -> bool:
    """Under SLURM / torchrun with several tasks: the process group, and detectron2's per-machine
    group."""
    from common.distributed import detect, init_distributed

    info = detect()
    if not info.is_distributed:
        return False
    import torch.distributed as dist

    import_detectron2()
    from detectron2.utils import comm

    init_distributed()
    # DDP over CPU modules takes no device_ids; detectron2 passes its local rank
    if not torch.cuda.is_available():
        from detectron2.engine import defaults

        if not getattr(defaults.create_ddp_model, "cpu_aware", False):
            original = defaults.create_ddp_model

            def create_ddp_model(model, **kwargs):
                return original(model, **{"device_ids": None, **kwargs})

            create_ddp_model.cpu_aware = True
            defaults.create_ddp_model = create_ddp_model
    per_machine = int(
        os.environ.get("SLURM_NTASKS_PER_NODE", os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    )
    for machine in range(info.world_size // per_machine):
        ranks = list(range(machine * per_machine, (machine + 1) * per_machine))
        group = dist.new_group(ranks)
        if info.rank in ranks:
            comm._LOCAL_PROCESS_GROUP = group
    return True


def load_weights(model, weights: Path):
    """Load a detectron2 .pkl into `model` with DetectionCheckpointer's matching heuristics (no
    logging of
    each tensor); return its incompatible-keys record. detectron2 has no public call that returns
    it."""
    import_detectron2()
    from detectron2.checkpoint import DetectionCheckpointer

    checkpointer = DetectionCheckpointer(model)
    return checkpointer._load_model(checkpointer._load_file(str(weights)))


def pretrained_resnet(arch: str, pkl: Path) -> tuple[torch.nn.Module, list[str]]:
    """detectron2's ResNet (torchvision-style: STRIDE_IN_1X1 False) loaded by DetectionCheckpointer;
    returns the
    model and the keys it reported as missing, unexpected or of the wrong shape."""
    import_detectron2()
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    configure_resnet(cfg, arch)  # depth and widths; ResNet-200 through the registered table builder
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    model = build_backbone(cfg, ShapeSpec(channels=3))
    incompatible = load_weights(model, pkl)
    problems = (
        list(incompatible.missing_keys)
        + list(incompatible.unexpected_keys)
        + [k for k, *_ in incompatible.incorrect_shapes]
    )
    return model.eval(), problems


def resnet_stages(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"stem": model.stem(x), **model(x)}


def train_and_evaluate(config, backbone, weights: Path, num_classes: int) -> dict[str, float]:
    """Train from the .pkl `weights` (or resume from the run's own checkpoint) on the datasets
    `register_datasets` registered (`num_classes` classes) and evaluate with COCOEvaluator or
    PascalVOCDetectionEvaluator; return bbox
    AP / AP50 / AP75 (COCO: also APs/m/l, and segm AP... for Mask R-CNN), in percent."""
    import math

    distributed = init_distributed_for_detectron2()
    cfg = model_config(config, backbone, weights, num_classes, distributed)
    Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
    from detectron2.utils.logger import setup_logger

    setup_logger(
        output=cfg.OUTPUT_DIR, name="detectron2", distributed_rank=int(os.environ.get("RANK", 0))
    )
    setup_logger(
        output=cfg.OUTPUT_DIR, name="fvcore", distributed_rank=int(os.environ.get("RANK", 0))
    )
    from detectron2.utils.env import seed_all_rng

    # as default_setup: the heads' init, the data order
    seed_all_rng(cfg.SEED + int(os.environ.get("RANK", 0)))
    trainer = build_trainer(cfg)
    if trainer.checkpointer.has_checkpoint():
        trainer.resume_or_load(resume=True)  # our own checkpoint in the run dir
    else:
        load_backbone_strictly(trainer.model.module if distributed else trainer.model, weights)
    trainer.train()
    # DefaultTrainer's EvalHook evaluates once at the end and keeps the result here; train() itself
    # returns it only when cfg.TEST.EXPECTED_RESULTS is set
    results = getattr(trainer, "_last_eval_results", None)
    metrics = {}
    for task in ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",):
        values = (results or {}).get(task) or {}
        if not values:  # COCOEvaluator returns nothing when the model detects nothing: AP is 0 then
            log.warning("detection: no %s predictions above the score threshold; AP = 0", task)
            values = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        for key, value in values.items():
            if "-" not in key and not math.isnan(value):  # the summary, not per-class APs
                metrics[f"{task}.{key}"] = float(value)
    return metrics
