"""The main job: pretraining -> export + verification -> every transfer task on the pretrained
backbone and on the same network at random init -> the report. Every step runs as a submitit job
(the local executor by default, one job at a time); a rerun skips the steps whose results exist.

Layout under `root`: pretrain/, scenes/, export/, <task>/<pretrained|random|NAME>/seed<k>/, report/.
The pretrained backbone is reported as `name` (ssl-hsic), random init as random-ARCH, the positive
control (`supervised`: the same network trained on the labels for the pretraining's budget,
pretrain.supervised) as supervised, and each of `backbones` (NAME=PATH, e.g. a published checkpoint)
under its own name.

With `pretrain_per_seed`, seed k pretrains (seed=k) under pretrain/seed<k>/ (export/seed<k>/,
supervised/seed<k>/) and its task runs evaluate that checkpoint; the report pools each recipe's
seeds into one column, so its interval spans the pretraining's seed-to-seed spread, not only the
tasks'."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.checks import Rule, checked, existing_file, one_of
from common.config import load_config
from common.distributed import check_global_batch
from common.errors import UserError
from common.numerics import describe
from pretrain.schema import PretrainConfig
from slurm.config_rules import SCENE_SIZES, SEEDS, TASK_FILES, TASK_OVERRIDES
from slurm.dispatch import run_graph
from slurm.executor import for_step, load_executor_config
from slurm.graph import Node
from slurm.steps import Job
from transfer.names import NAME
from transfer.tasks import TASKS, default_task_files, scene_overrides, task_of


@dataclass
class PipelineConfig:
    root: str = "runs/demo"
    executor: str = checked("configs/slurm/local.yaml", existing_file())
    executor_overrides: list = field(default_factory=list)
    pretrain_config: str = checked("configs/pretrain/fashion_mnist_resnet18.yaml", existing_file())
    pretrain_overrides: list = field(default_factory=list)
    scenes: dict = checked({"train": 200, "test": 50, "size": 128, "seed": 0}, SCENE_SIZES)
    tasks: dict = checked(default_task_files(), TASK_FILES)  # task (or TASK/LABEL) -> config file
    task_overrides: dict = checked({}, TASK_OVERRIDES)  # task -> [key=value, ...]
    seeds: list = checked([0], SEEDS)
    # which network the tasks evaluate
    weights: str = checked("ema", one_of("ema", "online", "target", "student", "teacher"))
    # generate scenes and point the dense tasks at them
    use_scenes: bool = True
    # the positive control: the network trained on the labels
    supervised: bool = True
    # pretrain (and train the control) once per seed, not once
    pretrain_per_seed: bool = False
    name: str = checked(
        "ssl-hsic", Rule("a backbone name (letters, digits, _ . + -)", lambda v: _is_name(v))
    )
    backbones: list = checked(
        [],
        Rule(
            "a list of NAME=PATH checkpoints evaluated beside the pretrained one",
            lambda v: isinstance(v, list) and all(_is_named(b) for b in v),
        ),
    )


def _is_name(value) -> bool:
    return isinstance(value, str) and bool(NAME.match(value))


def _is_named(value) -> bool:
    return isinstance(value, str) and "=" in value and _is_name(value.split("=", 1)[0])


class Pipeline:
    """Plans the main job's steps; runs them here as their dependencies allow (local executor,
    `run_local`) or
    submits them to SLURM as one dependency graph (slurm.graph) and returns."""

    def __init__(self, config: PipelineConfig, dry_run: bool = False):
        self.config = config
        self.root = Path(config.root)
        self.executor_config = load_executor_config(
            config.executor, list(config.executor_overrides)
        )
        self.executor_config.folder = str(self.root / "jobs")
        self.dry_run = dry_run

    # ------------------------------------------------------------------------------------ the plan

    def _pretrain_config(self):
        return load_config(
            PretrainConfig, self.config.pretrain_config, list(self.config.pretrain_overrides)
        )

    def plan(self) -> list:
        """Every step as a graph node, in an order where each comes after what it needs. Checks
        before
        anything runs: the pretraining config, its data, and that its global batch divides among its
        processes."""
        c, root = self.config, self.root
        pretrain = self._pretrain_config()
        processes = for_step(self.executor_config, "pretrain")
        processes = (
            processes.nodes * processes.tasks_per_node
            if self.executor_config.cluster == "slurm"
            else 1
        )
        check_global_batch(
            "optim.batch_size",
            pretrain.optim.batch_size,
            processes,
            f"the pretrain profile's {processes} processes (nodes x tasks_per_node)",
        )
        data = Path(pretrain.data.root) / (
            pretrain.data.split if pretrain.data.dataset == "imagefolder" else ""
        )
        if not data.exists():
            raise UserError(
                f"pretraining data {data} does not exist; set data.root in {c.pretrain_config} or "
                "pretrain_overrides"
            )
        arch = pretrain.model.backbone
        scenes = root / "scenes"
        nodes, task_dirs, self.report_dirs = [], [], []
        if c.use_scenes:
            s = c.scenes
            nodes.append(
                Node(
                    "scenes",
                    Job(
                        "scenes",
                        options={
                            "out": str(scenes),
                            "train": s["train"],
                            "test": s["test"],
                            "size": s["size"],
                            "seed": s["seed"],
                        },
                    ),
                    str(scenes / "classes.json"),
                )
            )
        names = [
            c.name,
            f"random-{arch}",
            *(spec.split("=", 1)[0] for spec in c.backbones),
            *(["supervised"] if c.supervised else []),
        ]
        if len(set(names)) < len(names) or {"pretrained", "random"} & set(names[2:]):
            raise UserError(
                f"backbone names must differ from each other and from 'pretrained' / 'random' / "
                f"'supervised': {names}"
            )
        # one pretraining (and supervised control) for every task seed, or one per seed:
        # pretrain/seedK/, ...
        recipes = (
            [(f"/seed{seed}", [seed], [f"seed={seed}"]) for seed in c.seeds]
            if c.pretrain_per_seed
            else [("", list(c.seeds), [])]
        )
        for suffix, seeds, seed_override in recipes:
            pretrain_dir, export_dir = root / f"pretrain{suffix}", root / f"export{suffix}"
            supervised_dir = root / f"supervised{suffix}"
            checkpoint = pretrain_dir / "checkpoints" / "last.pt"
            overrides = [*c.pretrain_overrides, *seed_override]
            nodes.append(
                Node(
                    f"pretrain{suffix}",
                    Job("pretrain", c.pretrain_config, overrides, str(pretrain_dir)),
                    str(pretrain_dir / "metrics.json"),
                )
            )
            nodes.append(
                Node(
                    f"export{suffix}",
                    Job(
                        "export",
                        options={
                            "checkpoint": str(checkpoint),
                            "format": "all",
                            "out": str(export_dir),
                            "weights": c.weights,
                        },
                    ),
                    str(export_dir / f"backbone_{c.weights}.pkl.json"),
                    needs=[f"pretrain{suffix}"],
                )
            )
            nodes.append(
                Node(
                    f"verify{suffix}",
                    Job(
                        "verify",
                        options={
                            "checkpoint": str(checkpoint),
                            "weights": c.weights,
                            "record": str(export_dir / "verified.json"),
                        },
                    ),
                    str(export_dir / "verified.json"),
                    needs=[f"pretrain{suffix}"],
                )
            )
            self.report_dirs.append(str(pretrain_dir))
            evaluated = [
                ("pretrained", f"{c.name}={checkpoint}", [f"verify{suffix}"]),
                ("random", f"random-{arch}=random:{arch}", []),
                *((spec.split("=", 1)[0], spec, []) for spec in c.backbones),
            ]
            # the same network and budget on the labels: how far apart the evaluation puts backbones
            if c.supervised:
                nodes.append(
                    Node(
                        f"supervised{suffix}",
                        Job("supervised", c.pretrain_config, overrides, str(supervised_dir)),
                        str(supervised_dir / "metrics.json"),
                    )
                )
                evaluated.append(
                    (
                        "supervised",
                        f"supervised={supervised_dir / 'backbone.pth'}",
                        [f"supervised{suffix}"],
                    )
                )
            for task, task_config in c.tasks.items():
                for kind, backbone, needs in evaluated:
                    needs = needs + (
                        ["scenes"] if c.use_scenes and scene_overrides(task, scenes) else []
                    )
                    for seed in seeds:
                        run_dir = root / task / kind / f"seed{seed}"
                        job = Job(
                            task_of(task),
                            task_config,
                            [
                                f"seed={seed}",
                                *(scene_overrides(task, scenes) if c.use_scenes else []),
                                *c.task_overrides.get(task, []),
                            ],
                            str(run_dir),
                            {"backbone": backbone, "weights": c.weights},
                        )
                        nodes.append(
                            Node(
                                f"{task}/{kind}/seed{seed}",
                                job,
                                str(run_dir / "metrics.json"),
                                needs=list(needs),
                                group=f"{task}/{kind}{suffix}",
                            )
                        )
                        task_dirs.append(str(run_dir))
        self.report_dirs += task_dirs
        self.pooled = (
            [c.name, *(["supervised"] if c.supervised else [])] if c.pretrain_per_seed else []
        )
        nodes.append(
            Node(
                "report",
                Job(
                    "report",
                    inputs=list(self.report_dirs),
                    options={"out": str(root / "report"), "pool": list(self.pooled)},
                ),
                str(root / "report" / "report.md"),
                needs=[n.name for n in nodes if n.step in TASKS],
            )
        )
        for step in {node.step for node in nodes}:  # every profile in use is valid
            for_step(self.executor_config, step)
        return nodes

    def run(self) -> dict:
        nodes = self.plan()
        numerics = None
        # where the numbers may differ (README)
        if not self.dry_run and self.executor_config.cluster != "slurm":
            numerics = describe(cpu_amp=self._pretrain_config().train.cpu_amp)
            print(f"[pipeline] {numerics}", flush=True)
        report = run_graph(
            nodes,
            self.executor_config,
            self.root,
            self.dry_run,
            "pipeline",
            self.report_dirs,
            pooled=self.pooled,
        )
        if numerics:
            print(f"[pipeline] {numerics}")
        return report
