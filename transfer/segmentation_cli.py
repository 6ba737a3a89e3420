"""python -m transfer segmentation --backbone PATH --config FILE [key=value ...]: FCN through mmsegmentation."""
from __future__ import annotations

import argparse

EPILOG = """\
examples:
  python -m transfer scenes --out runs/scenes
  python -m transfer segmentation --backbone runs/fm/checkpoints/last.pt --config configs/transfer/segmentation_scenes.yaml
  python -m transfer segmentation --backbone r50.pth --config configs/transfer/segmentation_voc_fcn.yaml
Keys and defaults: transfer/segmentation.py (SegmentationConfig). mmseg's logs and checkpoints: RUN_DIR/mmseg."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from transfer.runner import add_task_arguments
    add_task_arguments(parser, EPILOG)


def run(args: argparse.Namespace) -> None:
    from transfer.runner import run_task
    from transfer.segmentation import SegmentationConfig, run_segmentation

    def body(config, backbone, task_run):
        from transfer.segmentation import _dataset
        _dataset(config.data, "train", []), _dataset(config.data, "val", [])  # refuse missing data early
        task_run.start()
        metrics = run_segmentation(config, backbone, task_run.run_dir)
        protocol = f"fcn dilated-c5, {config.schedule.iterations} iterations"
        return metrics, config.data.dataset, protocol
    run_task("segmentation", SegmentationConfig, args, body)
