"""python -m transfer detection --backbone PATH --config FILE [key=value ...]: detectron2 Faster / Mask R-CNN."""
from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
examples:
  python -m transfer scenes --out runs/scenes
  python -m transfer detection --backbone runs/fm/checkpoints/last.pt --config configs/transfer/detection_scenes.yaml
  python -m transfer detection --backbone r50.pth --config configs/transfer/detection_voc_r50_c4.yaml
Keys and defaults: transfer/detection.py (DetectionConfig). detectron2's logs and checkpoints: RUN_DIR/detectron2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from transfer.runner import add_task_arguments
    add_task_arguments(parser, EPILOG)


def run(args: argparse.Namespace) -> None:
    from transfer.detection import DetectionConfig, register_datasets, run_detection
    from transfer.runner import run_task

    def body(config, backbone, task_run):
        register_datasets(config)  # refuse missing data before the run dir is written
        task_run.start()
        metrics = run_detection(config, backbone, task_run.run_dir)
        dataset = Path(config.data.train_json).parent.parent.name  # .../<dataset>/annotations/instances_*.json
        return metrics, dataset, f"{config.base}, {config.iterations} iterations"
    run_task("detection", DetectionConfig, args, body)
