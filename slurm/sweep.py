"""Sweeps: backbones x tasks x seeds (x override sets) as a graph of jobs (slurm.graph) without
dependencies.

On SLURM each task and backbone is one job array over its seeds and override sets, sized by the
task's profile and named after it (ssl-hsic:knn/random-resnet18); locally the jobs run here,
parallel_jobs at a time. Either way the manifest is the graph's (RUN_ROOT/manifest.json), so `python
-m slurm status` and `collect` read sweeps, pipelines and evaluations alike."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from common.checks import Rule, checked
from common.errors import UserError
from slurm import graph
from slurm.config_rules import KNOWN_TASKS, SEEDS
from slurm.dispatch import describe_graph, run_local
from slurm.executor import for_step, local_slots
from slurm.graph import Node
from slurm.steps import Job
from transfer.names import split_named
from transfer.tasks import TASKS, task_of


@dataclass
class SweepConfig:
    run_root: str = "runs/sweep"
    backbones: list = checked(
        [],
        Rule(
            "a list of [NAME=]checkpoint paths or [NAME=]random:ARCH",
            lambda v: isinstance(v, list) and all(isinstance(b, str) for b in v),
        ),
    )
    tasks: dict = checked({}, KNOWN_TASKS)
    seeds: list = checked([0], SEEDS)
    overrides: list = checked(
        [[]],
        Rule(
            "a list of override lists, e.g. [[], [linear.lr=0.1]]",
            lambda v: isinstance(v, list) and v and all(isinstance(o, list) for o in v),
        ),
    )


def plan(config: SweepConfig) -> list:
    """The sweep's graph: a node per task x backbone x seed x override set, grouped per task and
    backbone."""
    if not config.backbones or not config.tasks:
        raise UserError(
            "a sweep needs at least one backbone (backbones: [...]) and one task (tasks: {task: "
            "config})"
        )
    unknown = sorted(key for key in config.tasks if not task_of(key))
    if unknown:
        raise UserError(f"unknown sweep tasks {unknown}; choose from {', '.join(TASKS)}")
    named: dict[str, str] = {}
    for backbone in config.backbones:
        name = split_named(backbone)[0]
        if name in named:
            raise UserError(
                f"backbones {named[name]} and {backbone} are both named '{name}'; name them apart "
                f"with "
                "NAME=PATH"
            )
        named[name] = backbone
    nodes = []
    for (task, task_config), backbone, seed, (index, overrides) in itertools.product(
        config.tasks.items(), config.backbones, config.seeds, enumerate(config.overrides)
    ):
        suffix = f"_o{index}" if len(config.overrides) > 1 else ""
        name = split_named(backbone)[0]
        run_dir = Path(config.run_root) / task / name / f"seed{seed}{suffix}"
        job = Job(
            task_of(task),
            task_config,
            [f"seed={seed}", *overrides],
            str(run_dir),
            {"backbone": backbone},
        )
        nodes.append(
            Node(
                f"{task}/{name}/seed{seed}{suffix}",
                job,
                str(run_dir / "metrics.json"),
                group=f"{task}/{name}",
            )
        )
    return nodes


def run(config: SweepConfig, executor_config, dry_run: bool = False, wait: bool = False) -> list:
    """Print the plan (dry run), submit it to SLURM (and with `wait`, wait for it), or run it
    here; the nodes."""
    root = Path(config.run_root)
    executor_config.folder = str(root / "jobs")
    nodes = plan(config)
    for step in {node.step for node in nodes}:  # every profile in use is valid
        for_step(executor_config, step)
    if dry_run:
        describe_graph(nodes, executor_config, root, "sweep")
    elif executor_config.cluster == "slurm":
        graph.submit(nodes, executor_config, root)
        print(f"submitted {len(nodes)} jobs (slurm); manifest {root / graph.MANIFEST}")
        if wait:
            graph.wait(nodes)
    else:
        run_local(nodes, executor_config, "sweep", root, local_slots(executor_config))
        print(
            f"ran {len(nodes)} jobs ({executor_config.cluster}); manifest {root / graph.MANIFEST}"
        )
    return nodes
