"""The detection task: detection and instance segmentation through detectron2's own trainer and COCOEvaluator.

The MoCo protocol (He et al. 2020, detection/configs); detectron2's side of it (the model config, the trainer,
the strict weight loading) lives in transfer.detectron2_glue.

The canonical backbone is written as a detectron2 .pkl in the run dir and loaded with DetectionCheckpointer's
matching heuristics. Loading must be complete: every key of the file must land in the model and every ResNet
parameter of the model must come from the file; anything else stops the run before training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from transfer.backbone import Backbone
from transfer.runner import TaskResult


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
class Config:
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


EXAMPLES = """\
examples:
  python -m transfer scenes --out runs/scenes
  python -m transfer detection --backbone runs/fm/checkpoints/last.pt --config configs/transfer/detection_scenes.yaml
  python -m transfer detection --backbone r50.pth --config configs/transfer/detection_voc_r50_c4.yaml
Keys and defaults: transfer/tasks/detection.py (Config). detectron2's logs and checkpoints: RUN_DIR/detectron2."""


def prepare(task: str, config: Config) -> None:
    from transfer.detectron2_glue import register_datasets
    register_datasets(config)


def run(task: str, config: Config, backbone: Backbone, task_run, data) -> TaskResult:
    from transfer import export
    from transfer.detectron2_glue import train_and_evaluate
    weights = export.write(backbone, "detectron2", task_run.run_dir / "backbone.pkl")
    metrics = train_and_evaluate(config, backbone, weights)
    dataset = Path(config.data.train_json).parent.parent.name  # .../<dataset>/annotations/instances_*.json
    return TaskResult(metrics, dataset, f"{config.base}, {config.iterations} iterations")
