"""The transfer task registry: every command, job, pipeline, sweep and report reads the tasks here.

A task is a module of this package holding

    Config                             its config schema: a dataclass extending contract.TaskConfig (the shared
                                       run_dir, protocol_id, seed, device); YAML files and key=value override it
    EXAMPLES                           command lines shown by --help
    prepare(config) -> data            read and check the data, before the run dir is written
    run(config, backbone, run, data)   train / evaluate; returns a transfer.runner.TaskResult

and one `Task` entry below, which declares the rest of its contract: its help line, its default
config file (the one the pipeline runs), how it points at the generated scenes (config keys -> paths
under the scenes folder) and which of its metrics improve downwards. Adding a task is one new module
and one entry below. The modules import mmseg / detectron2 only inside their functions (through
transfer.mmseg_glue / transfer.detectron2_glue), so the registry stays light."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable

from common.errors import UserError


@dataclass(frozen=True)
class Task:
    name: str
    module: str  # transfer.tasks.<module>
    help: str  # one line, for --help
    config_file: str  # the default config (the pipeline's), under configs/transfer/
    # config key -> path under the generated scenes
    scenes: dict[str, str] = field(default_factory=dict)
    # metrics that improve downwards; the others improve upwards
    lower_is_better: tuple[str, ...] = ()
    # the pipeline runs it as TASK/LABEL (one of several configs, e.g. classify/digits)
    label: str = ""
    entry: str = "run"  # the module's run function (two tasks may share a module)

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def runner(self) -> Callable:
        return getattr(self.load(), self.entry)


TASKS = {
    task.name: task
    for task in (
        Task(
            "linear",
            "transfer.tasks.linear_knn",
            "linear classification on frozen (cached) features",
            "configs/transfer/linear_fashion_mnist.yaml",
            entry="run_linear",
        ),
        Task(
            "knn",
            "transfer.tasks.linear_knn",
            "k-nearest-neighbour classification on frozen (cached) features",
            "configs/transfer/linear_fashion_mnist.yaml",
            entry="run_knn",
        ),
        Task(
            "segmentation",
            "transfer.tasks.segmentation",
            "semantic segmentation (FCN) through mmsegmentation",
            "configs/transfer/segmentation_scenes.yaml",
            {"data.root": "voc/VOC2012"},
        ),
        Task(
            "detection",
            "transfer.tasks.detection",
            "detection / instance segmentation through detectron2",
            "configs/transfer/detection_scenes.yaml",
            {
                "data.train_json": "coco/annotations/instances_train.json",
                "data.train_images": "coco/train",
                "data.test_json": "coco/annotations/instances_val.json",
                "data.test_images": "coco/val",
            },
        ),
        Task(
            "depth",
            "transfer.tasks.depth",
            "monocular depth (FCRN up-projection decoder, berHu loss)",
            "configs/transfer/depth_scenes.yaml",
            {"data.root": "nyu"},
            lower_is_better=("rms", "rel", "log10"),
        ),
        Task(
            "finetune",
            "transfer.tasks.finetune",
            "fine-tuning the whole network on few labels (1 and 10 percent)",
            "configs/transfer/finetune_fashion_mnist.yaml",
        ),
        Task(
            "classify",
            "transfer.tasks.classify",
            "transfer to other classification datasets: linear (L-BFGS) and fine-tuning",
            "configs/transfer/classify_digits.yaml",
            label="digits",
        ),
    )
}


def task_of(key: str) -> str | None:
    """The task a key of a tasks mapping (pipeline, evaluate, sweep) runs: 'TASK', or 'TASK/LABEL'
    for one task run several times with different configs (classify/pets, classify/cars); None when
    TASK is not registered or
    LABEL is not a plain name."""
    task, _, label = key.partition("/")
    if task not in TASKS or (_ and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", label)):
        return None
    return task


def get(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def default_task_files() -> dict[str, str]:
    """Every task under its pipeline key (TASK or TASK/LABEL) with its default config file: the
    pipeline's tasks."""
    return {(f"{t.name}/{t.label}" if t.label else t.name): t.config_file for t in TASKS.values()}


def scene_overrides(key: str, scenes: Path) -> list[str]:
    """key=value overrides that point a task's config at generated scenes under `scenes` (none for a
    task that
    reads no scenes)."""
    task = task_of(key)
    return (
        [f"{name}={Path(scenes) / path}" for name, path in TASKS[task].scenes.items()]
        if task
        else []
    )


def lower_is_better() -> set[str]:
    """The metrics (base names) that improve downwards, over every task."""
    return {metric for task in TASKS.values() for metric in task.lower_is_better}
