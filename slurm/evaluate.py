"""`python -m slurm evaluate`: several named backbones x tasks x seeds, then the report that
compares them.

Each run is a job (the local executor by default: run here, parallel_jobs at a time; on SLURM the
whole graph is submitted at once, a job array per task and backbone, the report as a job after
them). A run whose metrics.json exists is skipped, so rerunning the command adds only what is
missing.

Layout under `root`: <task>/<backbone name>/seed<k>/, report/, jobs/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.checks import Rule, checked, existing_file, one_of
from common.errors import UserError
from slurm.config_rules import SEEDS, TASK_FILES, TASK_OVERRIDES
from slurm.dispatch import run_graph
from slurm.executor import for_step, load_executor_config
from slurm.graph import Node
from slurm.steps import Job
from transfer import WEIGHTS
from transfer.names import split_named
from transfer.tasks import task_of


@dataclass
class EvaluateConfig:
    root: str = "runs/evaluate"
    executor: str = checked("configs/slurm/local.yaml", existing_file())
    executor_overrides: list = field(default_factory=list)
    backbones: list = checked(
        [],
        Rule(
            "a non-empty list of [NAME=]checkpoint paths or [NAME=]random:ARCH",
            lambda v: isinstance(v, list) and v and all(isinstance(b, str) for b in v),
        ),
    )
    tasks: dict = checked({}, TASK_FILES)  # task -> config file
    task_overrides: dict = checked({}, TASK_OVERRIDES)  # task -> [key=value, ...]
    seeds: list = checked([0], SEEDS)
    weights: str = checked("ema", one_of(*WEIGHTS))
    baseline: str = ""  # the backbone name every other is compared with; "": random init


def plan(config: EvaluateConfig) -> list:
    """The graph: a node per task x backbone x seed, then the report."""
    if not config.tasks:
        raise UserError("nothing to evaluate: give at least one task (tasks: {task: config file})")
    root = Path(config.root)
    named: dict[str, str] = {}
    for spec in config.backbones:
        name, path = split_named(spec)
        if name in named:
            raise UserError(
                f"backbones {named[name]} and {spec} are both named '{name}'; name them apart with "
                f"NAME=PATH"
            )
        if not path.startswith("random:") and not Path(path).is_file():
            raise UserError(f"backbone '{name}': checkpoint {path} does not exist")
        named[name] = spec
    if config.baseline and config.baseline not in named:
        raise UserError(
            f"baseline '{config.baseline}' is none of the backbones ({', '.join(named)})"
        )
    nodes, run_dirs = [], []
    for task, task_config in config.tasks.items():
        for name, spec in named.items():
            for seed in config.seeds:
                run_dir = root / task / name / f"seed{seed}"
                job = Job(
                    task_of(task),
                    task_config,
                    [f"seed={seed}", *config.task_overrides.get(task, [])],
                    str(run_dir),
                    {"backbone": f"{name}={split_named(spec)[1]}", "weights": config.weights},
                )
                nodes.append(
                    Node(
                        f"{task}/{name}/seed{seed}",
                        job,
                        str(run_dir / "metrics.json"),
                        group=f"{task}/{name}",
                    )
                )
                run_dirs.append(str(run_dir))
    nodes.append(
        Node(
            "report",
            Job(
                "report",
                inputs=run_dirs,
                options={"out": str(root / "report"), "baseline": config.baseline or None},
            ),
            str(root / "report" / "report.md"),
            needs=[n.name for n in nodes],
        )
    )
    return nodes


def evaluate(config: EvaluateConfig, dry_run: bool = False) -> dict:
    executor_config = load_executor_config(config.executor, list(config.executor_overrides))
    executor_config.folder = str(Path(config.root) / "jobs")
    nodes = plan(config)
    for step in {node.step for node in nodes}:  # every profile in use is valid
        for_step(executor_config, step)
    return run_graph(
        nodes,
        executor_config,
        Path(config.root),
        dry_run,
        "evaluate",
        nodes[-1].job.inputs,
        config.baseline or None,
    )
