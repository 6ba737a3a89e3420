"""The transfer task registry: every command, job, pipeline, sweep and report reads the task names here.

A task is one module of this package holding
    Config                                  its config schema (a dataclass; YAML files and key=value override it)
    EXAMPLES                                command lines shown by --help
    prepare(task, config) -> data           read and check the data, before the run dir is written
    run(task, config, backbone, run, data)  train / evaluate; returns a transfer.runner.TaskResult
Adding a task is one new module and one line below. The modules import mmseg / detectron2 only inside
their functions (through transfer.mmseg_glue / transfer.detectron2_glue), so the registry stays light.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Task:
    name: str
    module: str
    help: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


TASKS = {task.name: task for task in (
    Task("linear", "transfer.tasks.classification", "linear classification on frozen (cached) features"),
    Task("knn", "transfer.tasks.classification", "k-nearest-neighbour classification on frozen (cached) features"),
    Task("segmentation", "transfer.tasks.segmentation", "semantic segmentation (FCN) through mmsegmentation"),
    Task("detection", "transfer.tasks.detection", "detection / instance segmentation through detectron2"),
    Task("depth", "transfer.tasks.depth", "monocular depth (FCRN up-projection decoder, berHu loss)"),
    Task("finetune", "transfer.tasks.finetune", "fine-tuning the whole network on few labels (1 and 10 percent)"),
    Task("classify", "transfer.tasks.classify", "transfer to other classification datasets: linear (L-BFGS) and "
                                                "fine-tuning"),
)}


def task_of(key: str) -> str | None:
    """The task a key of a tasks mapping (pipeline, evaluate, sweep) runs: 'TASK', or 'TASK/LABEL' for one task run
    several times with different configs (classify/pets, classify/cars); None when TASK is not registered or
    LABEL is not a plain name."""
    import re
    task, _, label = key.partition("/")
    if task not in TASKS or (_ and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", label)):
        return None
    return task


def get(name: str) -> Task:
    from common.errors import UserError
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'; choose one of {', '.join(TASKS)}")
    return TASKS[name]
