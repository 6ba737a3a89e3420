"""The detection task: detection and instance segmentation through detectron2's own trainer and
evaluators (COCOEvaluator on COCO-format data; PascalVOCDetectionEvaluator on the VOC layout, read
by detectron2's own Pascal VOC loader).

The MoCo protocol (He et al. 2020, detection/configs); detectron2's side of it (the model config,
the trainer, the strict weight loading) lives in transfer.detectron2_glue.

The canonical backbone is written as a detectron2 .pkl in the run dir and loaded with
DetectionCheckpointer's matching heuristics. Loading must be complete: every key of the file must
land in the model and every ResNet parameter of the model must come from the file; anything else
stops the run before training."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
from transfer import export
from transfer.backbone import Backbone
from transfer.runner import TaskResult
from transfer.tasks.contract import TaskConfig


@dataclass
class DetectionData:
    # coco: the JSON files below; voc: the VOC layout under voc_root
    format: str = checked("coco", one_of("coco", "voc"))
    # holds VOC2007/ (and VOC2012/): JPEGImages, Annotations, ImageSets/Main
    voc_root: str = ""
    # <year folder>/<image set>, concatenated
    voc_train: tuple = ("VOC2007/trainval", "VOC2012/trainval")
    # scored with VOC's AP; 11-point (VOC07 metric) for a 2007 set
    voc_test: str = "VOC2007/test"
    # voc: the class names in the XML; empty = VOC's 20 classes
    class_names: tuple = ()
    train_json: str = "runs/scenes/coco/annotations/instances_train.json"
    train_images: str = "runs/scenes/coco/train"
    test_json: str = "runs/scenes/coco/annotations/instances_val.json"
    test_images: str = "runs/scenes/coco/val"
    min_size_train: tuple = checked((96, 112, 128), each(POSITIVE_INT))
    max_size_train: int = checked(213, POSITIVE_INT)
    min_size_test: int = checked(128, POSITIVE_INT)
    max_size_test: int = checked(213, POSITIVE_INT)
    num_workers: int = checked(1, NON_NEGATIVE)


@dataclass
class Config(TaskConfig):
    run_dir: str = "runs/detection"
    # a detectron2 model-zoo config
    base: str = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
    data: DetectionData = field(default_factory=DetectionData)
    iterations: int = checked(300, at_least(2))
    # images per iteration, over all processes
    batch_size: int = checked(4, POSITIVE_INT)
    lr: float = checked(0.02, greater_than(0))
    weight_decay: float = checked(1e-4, NON_NEGATIVE)
    # lr x0.1 at these fractions
    steps: tuple = checked((0.75, 0.92), each(between(0, 1), ordered=True))
    warmup_iters: int = checked(50, NON_NEGATIVE)
    checkpoint_period: int = checked(100, POSITIVE_INT)
    extra_norm_res5: bool = False  # MoCo's Res5ROIHeadsExtraNorm (R50-C4)
    # BatchNorm over processes (one process: BN);
    norm: str = checked("SyncBN", one_of("SyncBN", "naiveSyncBN"))
    # SyncBN on CPU processes becomes naiveSyncBN (torch's
    # runs on GPUs)
    # detectron2's PreciseBN hook: BN statistics re-estimated before testing
    precise_bn: bool = False
    precise_bn_iters: int = checked(200, POSITIVE_INT)
    opts: list = field(default_factory=list)  # any further detectron2 KEY VALUE pairs


EXAMPLES = """\
examples:
  python -m transfer scenes --out runs/scenes
  python -m transfer detection --backbone runs/fm/checkpoints/last.pt --config configs/transfer/detection_scenes.yaml
  python -m transfer detection --backbone r50.pth --config configs/transfer/detection_voc_r50_c4.yaml
Keys and defaults: transfer/tasks/detection.py (Config). detectron2's logs and checkpoints: RUN_DIR/detectron2."""


def prepare(config: Config) -> int:
    """Register the train and test sets with detectron2 (refusing missing files); the class
    count."""
    from transfer import detectron2_glue

    return detectron2_glue.register_datasets(config)


def run(config: Config, backbone: Backbone, task_run, data) -> TaskResult:
    from transfer import detectron2_glue

    weights = export.write(backbone, "detectron2", task_run.run_dir / "backbone.pkl")
    metrics = detectron2_glue.train_and_evaluate(config, backbone, weights, num_classes=data)
    d = config.data
    if d.format == "voc":
        dataset, scoring = (
            f"voc:{'+'.join(d.voc_train)}->{d.voc_test}",
            "PascalVOCDetectionEvaluator",
        )
    else:  # .../<dataset>/annotations/instances_*.json
        dataset, scoring = Path(d.train_json).parent.parent.name, "COCOEvaluator"
    return TaskResult(metrics, dataset, f"{config.base}, {config.iterations} iterations, {scoring}")
