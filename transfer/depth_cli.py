"""python -m transfer depth --backbone PATH --config FILE [key=value ...]: FCRN depth estimation."""
from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
examples:
  python -m transfer scenes --out runs/scenes
  python -m transfer depth --backbone runs/fm/checkpoints/last.pt --config configs/transfer/depth_scenes.yaml
  python -m transfer depth --backbone r50.pth --config configs/transfer/depth_nyu.yaml
Keys and defaults: transfer/depth.py (DepthConfig)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from transfer.runner import add_task_arguments
    add_task_arguments(parser, EPILOG)


def run(args: argparse.Namespace) -> None:
    from transfer.datasets import build_depth_dataset
    from transfer.depth import DepthConfig, run_depth
    from transfer.runner import pick_device, run_task

    def body(config, backbone, task_run):
        d = config.data
        for split in (d.train_split, d.test_split):  # refuse missing data before the run dir is written
            build_depth_dataset(d.kind, d.root, split, d.splits_file)
        task_run.start()
        metrics = run_depth(config, backbone, task_run.run_dir, pick_device(config.device))
        return metrics, f"{d.kind}:{Path(d.root).name}", f"fcrn up-projection, berHu, {config.steps} steps"
    run_task("depth", DepthConfig, args, body)
