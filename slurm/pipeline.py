"""The main job: pretraining -> export + verification -> every transfer task on the pretrained backbone and on
the same network at random init -> the report. Every step runs as a submitit job (the local executor by
default, one job at a time); a rerun skips the steps whose results exist.

Layout under `root`: pretrain/, scenes/, export/, <task>/<pretrained|random|NAME>/seed<k>/, report/. The
pretrained backbone is reported as `name` (ssl-hsic), random init as random-ARCH, the positive control
(`supervised`: the same network trained on the labels for the pretraining's budget, pretrain.supervised) as
supervised, and each of `backbones` (NAME=PATH, e.g. a published checkpoint) under its own name.

With `pretrain_per_seed`, seed k pretrains (seed=k) under pretrain/seed<k>/ (export/seed<k>/,
supervised/seed<k>/) and its task runs evaluate that checkpoint; the report pools each recipe's seeds into one
column, so its interval spans the pretraining's seed-to-seed spread, not only the tasks'.
"""
from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.checks import Rule, checked, existing_file, one_of
from common.errors import UserError
from slurm.sweep import SEEDS
from transfer.tasks import TASKS, task_of


def _task_files(value) -> bool:
    return isinstance(value, dict) and all(task_of(key) and Path(path).is_file() for key, path in value.items())


def _scene_sizes(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"train", "test", "size", "seed"}
            and all(isinstance(v, int) for v in value.values())
            and value["train"] >= 1 and value["test"] >= 1 and value["size"] >= 32 and value["seed"] >= 0)


TASK_FILES = Rule(f"a mapping of tasks ({', '.join(TASKS)}; TASK/LABEL to run one several times) to existing config "
                  "files", _task_files)
TASK_OVERRIDES = Rule(f"a mapping of tasks ({', '.join(TASKS)}, or TASK/LABEL) to lists of key=value",
                      lambda v: isinstance(v, dict) and all(task_of(t) and isinstance(o, list) for t, o in v.items()))
SCENE_SIZES = Rule("{train: >= 1, test: >= 1, size: >= 32, seed: >= 0}", _scene_sizes)


@dataclass
class PipelineConfig:
    root: str = "runs/demo"
    executor: str = checked("configs/slurm/local.yaml", existing_file())
    executor_overrides: list = field(default_factory=list)
    pretrain_config: str = checked("configs/pretrain/fashion_mnist_resnet18.yaml", existing_file())
    pretrain_overrides: list = field(default_factory=list)
    scenes: dict = checked({"train": 200, "test": 50, "size": 128, "seed": 0}, SCENE_SIZES)
    tasks: dict = checked({
        "linear": "configs/transfer/linear_fashion_mnist.yaml", "knn": "configs/transfer/linear_fashion_mnist.yaml",
        "segmentation": "configs/transfer/segmentation_scenes.yaml",
        "detection": "configs/transfer/detection_scenes.yaml", "depth": "configs/transfer/depth_scenes.yaml",
        "finetune": "configs/transfer/finetune_fashion_mnist.yaml",
        "classify/digits": "configs/transfer/classify_digits.yaml"},
        TASK_FILES)
    task_overrides: dict = checked({}, TASK_OVERRIDES)      # task -> [key=value, ...]
    seeds: list = checked([0], SEEDS)
    weights: str = checked("ema", one_of("ema", "online", "target", "student", "teacher"))  # which network the tasks evaluate
    use_scenes: bool = True                               # generate scenes and point the dense tasks at them
    supervised: bool = True                               # the positive control: the network trained on the labels
    pretrain_per_seed: bool = False                       # pretrain (and train the control) once per seed, not once
    name: str = checked("ssl-hsic", Rule("a backbone name (letters, digits, _ . + -)", lambda v: _is_name(v)))
    backbones: list = checked([], Rule("a list of NAME=PATH checkpoints evaluated beside the pretrained one",
                                       lambda v: isinstance(v, list) and all(_is_named(b) for b in v)))


def _is_name(value) -> bool:
    from transfer.names import NAME
    return isinstance(value, str) and bool(NAME.match(value))


def _is_named(value) -> bool:
    return isinstance(value, str) and "=" in value and _is_name(value.split("=", 1)[0])


def scene_overrides(task: str, scenes: Path) -> list[str]:
    """Point a scenes-based task config at the pipeline's own generated scenes."""
    coco = scenes / "coco"
    return {"segmentation": [f"data.root={scenes / 'voc' / 'VOC2012'}"],
            "detection": [f"data.train_json={coco / 'annotations' / 'instances_train.json'}",
                          f"data.train_images={coco / 'train'}",
                          f"data.test_json={coco / 'annotations' / 'instances_val.json'}",
                          f"data.test_images={coco / 'val'}"],
            "depth": [f"data.root={scenes / 'nyu'}"]}.get(task_of(task), [])


class Pipeline:
    """Plans the main job's steps; runs them here as their dependencies allow (local executor, `run_local`) or
    submits them to SLURM as one dependency graph (slurm.graph) and returns."""

    def __init__(self, config: PipelineConfig, dry_run: bool = False):
        from slurm.executor import load_executor_config
        self.config = config
        self.root = Path(config.root)
        self.executor_config = load_executor_config(config.executor, list(config.executor_overrides))
        self.executor_config.folder = str(self.root / "jobs")
        self.dry_run = dry_run

    # ------------------------------------------------------------------------------------ the plan

    def _pretrain_config(self):
        from common.config import load_config
        from pretrain.schema import PretrainConfig
        return load_config(PretrainConfig, self.config.pretrain_config, list(self.config.pretrain_overrides))

    def plan(self) -> list:
        """Every step as a graph node, in an order where each comes after what it needs. Checks before
        anything runs: the pretraining config, its data, and that its global batch divides among its processes."""
        from slurm.executor import for_step
        from slurm.graph import Node
        c, root = self.config, self.root
        pretrain = self._pretrain_config()
        processes = for_step(self.executor_config, "pretrain")
        processes = processes.nodes * processes.tasks_per_node if self.executor_config.cluster == "slurm" else 1
        from common.distributed import check_global_batch
        check_global_batch("optim.batch_size", pretrain.optim.batch_size, processes,
                           f"the pretrain profile's {processes} processes (nodes x tasks_per_node)")
        data = Path(pretrain.data.root) / (pretrain.data.split if pretrain.data.dataset == "imagefolder" else "")
        if not data.exists():
            raise UserError(f"pretraining data {data} does not exist; set data.root in {c.pretrain_config} or "
                            "pretrain_overrides")
        arch = pretrain.model.backbone
        scenes = root / "scenes"
        nodes, task_dirs, self.report_dirs = [], [], []
        if c.use_scenes:
            s = c.scenes
            nodes.append(Node("scenes", "scenes", ["--out", str(scenes), "--train", str(s["train"]), "--test",
                                                   str(s["test"]), "--size", str(s["size"]), "--seed", str(s["seed"])],
                              str(scenes / "classes.json")))
        names = [c.name, f"random-{arch}", *(spec.split("=", 1)[0] for spec in c.backbones),
                 *(["supervised"] if c.supervised else [])]
        if len(set(names)) < len(names) or {"pretrained", "random"} & set(names[2:]):
            raise UserError(f"backbone names must differ from each other and from 'pretrained' / 'random' / "
                            f"'supervised': {names}")
        # one pretraining (and supervised control) for every task seed, or one per seed: pretrain/seedK/, ...
        recipes = [(f"/seed{seed}", [seed], [f"seed={seed}"]) for seed in c.seeds] if c.pretrain_per_seed \
            else [("", list(c.seeds), [])]
        for suffix, seeds, seed_override in recipes:
            pretrain_dir, export_dir = root / f"pretrain{suffix}", root / f"export{suffix}"
            supervised_dir = root / f"supervised{suffix}"
            checkpoint = pretrain_dir / "checkpoints" / "last.pt"
            overrides = [*c.pretrain_overrides, *seed_override]
            nodes.append(Node(f"pretrain{suffix}", "pretrain", ["--config", c.pretrain_config,
                                                                f"run_dir={pretrain_dir}", *overrides],
                              str(pretrain_dir / "metrics.json")))
            nodes.append(Node(f"export{suffix}", "export", ["--checkpoint", str(checkpoint), "--format", "all", "--out",
                                                            str(export_dir), "--weights", c.weights],
                              str(export_dir / f"backbone_{c.weights}.pkl.json"), needs=[f"pretrain{suffix}"]))
            nodes.append(Node(f"verify{suffix}", "verify", ["--checkpoint", str(checkpoint), "--weights", c.weights,
                                                            "--record", str(export_dir / "verified.json")],
                              str(export_dir / "verified.json"), needs=[f"pretrain{suffix}"]))
            self.report_dirs.append(str(pretrain_dir))
            evaluated = [("pretrained", f"{c.name}={checkpoint}", [f"verify{suffix}"]),
                         ("random", f"random-{arch}=random:{arch}", []),
                         *((spec.split("=", 1)[0], spec, []) for spec in c.backbones)]
            if c.supervised:  # the same network and budget on the labels: how far apart the evaluation puts backbones
                nodes.append(Node(f"supervised{suffix}", "supervised", ["--config", c.pretrain_config,
                                                                        f"run_dir={supervised_dir}", *overrides],
                                  str(supervised_dir / "metrics.json")))
                evaluated.append(("supervised", f"supervised={supervised_dir / 'backbone.pth'}", [f"supervised{suffix}"]))
            for task, task_config in c.tasks.items():
                for kind, backbone, needs in evaluated:
                    needs = needs + (["scenes"] if c.use_scenes and scene_overrides(task, scenes) else [])
                    for seed in seeds:
                        run_dir = root / task / kind / f"seed{seed}"
                        argv = ["--backbone", backbone, "--weights", c.weights, "--config", task_config,
                                f"run_dir={run_dir}", f"seed={seed}",
                                *(scene_overrides(task, scenes) if c.use_scenes else []),
                                *c.task_overrides.get(task, [])]
                        nodes.append(Node(f"{task}/{kind}/seed{seed}", task_of(task), argv,
                                          str(run_dir / "metrics.json"), needs=list(needs), group=f"{task}/{kind}{suffix}"))
                        task_dirs.append(str(run_dir))
        self.report_dirs += task_dirs
        self.pooled = [c.name, *(["supervised"] if c.supervised else [])] if c.pretrain_per_seed else []
        nodes.append(Node("report", "report", [*self.report_dirs, "--out", str(root / "report"),
                                               *(["--pool", *self.pooled] if self.pooled else [])],
                          str(root / "report" / "report.md"), needs=[n.name for n in nodes if n.step in TASKS]))
        for step in {node.step for node in nodes}:  # every profile in use is valid
            for_step(self.executor_config, step)
        return nodes

    def run(self) -> dict:
        nodes = self.plan()
        numerics = None
        if not self.dry_run and self.executor_config.cluster != "slurm":  # where the numbers may differ (README)
            from common.numerics import describe
            numerics = describe(cpu_amp=self._pretrain_config().train.cpu_amp)
            print(f"[pipeline] {numerics}", flush=True)
        report = run_graph(nodes, self.executor_config, self.root, self.dry_run, "pipeline", self.report_dirs,
                           pooled=self.pooled)
        if numerics:
            print(f"[pipeline] {numerics}")
        return report


# ------------------------------------------------------------------------------------------- running

def run_local(nodes, executor_config, label: str) -> dict:
    """Run the graph's jobs here as local submitit jobs, each as soon as the jobs it needs are done, up to
    `local_slots` at a time, taking ready jobs in the plan's order (so that pretraining starts first). Steps done
    before are skipped. When a job fails, no new job starts; the running ones finish, then the first failure is
    raised. Returns each job's start and end in seconds from the start, and the jobs it waited for."""
    from slurm.executor import build_executor, for_step, job_name, local_slots, local_threads, report_failure
    from slurm.jobs import StepJob
    slots, started, times = local_slots(executor_config), time.time(), {}
    finished = {node.name for node in nodes if node.is_done}
    for node in nodes:
        if node.name in finished:
            print(f"[{label}] {node.name}: done before, skipped")
    waiting = [node for node in nodes if node.name not in finished]
    running, failures = {}, []
    while waiting or running:
        for node in list(waiting):
            if failures or len(running) >= slots:
                break
            if all(need in finished for need in node.needs):
                config = for_step(executor_config, node.step)  # the step's own profile (its time limit) here too
                with local_threads(config):
                    job = build_executor(config, name=job_name(config, node.name)).submit(
                        StepJob(node.step, node.argv, config.signal_delay_s))
                running[node.name] = job
                times[node.name] = {"start_s": round(time.time() - started, 1), "needs": list(node.needs)}
                waiting.remove(node)
                print(f"[{label}] {node.name}: job {job.job_id} ({config.cluster})", flush=True)
        if not running:  # nothing can start: what is left waits on a failed job
            break
        time.sleep(0.5)
        for name, job in list(running.items()):
            try:
                if not job.done():
                    continue
                del running[name]
                job.result()
            except Exception:  # (the debug executor runs the job inside done(), and raises there)
                running.pop(name, None)
                times[name]["end_s"] = round(time.time() - started, 1)
                failures.append(f"{label} step {name} failed: " + report_failure(job).replace("\n", " |"))
                print(f"[{label}] {failures[-1]}" + (f"; waiting for the running {', '.join(running)}"
                                                     if running else ""), flush=True)
                continue
            times[name]["end_s"] = round(time.time() - started, 1)
            finished.add(name)
            print(f"[{label}] {name}: finished in {times[name]['end_s'] - times[name]['start_s']:.0f} s", flush=True)
    if failures:
        raise UserError(failures[0])
    if waiting:  # the plan names a job that no job provides: a bug, not the user's input
        raise RuntimeError(f"{label}: {', '.join(n.name for n in waiting)} wait on jobs that are not in the graph")
    return times


def describe_graph(nodes, executor_config, root: Path, label: str) -> None:
    """The dry run: what a run would do, job by job. On SLURM, each job or job array's sbatch flags as
    slurm.graph.submit sends them (the same plan and the same executor), with the jobs it waits for as
    {name} where their ids will be (--dependency=afterok:{pretrain}:{verify}), then each task's command line;
    locally, each step's command in the order they run."""
    from slurm.executor import sbatch_flags, show_flags, step_command
    if executor_config.cluster == "slurm":
        from slurm.graph import plan
        batches, current = plan(nodes, executor_config, root)
        submitted = {node.name for batch in batches for node in batch.nodes}
        for node in nodes:
            if node.name not in submitted:
                state, _ = current[node.name]
                print(f"[{label}] {node.name}: {state}" + (f" (job {node.job_id})" if state != "DONE" else "")
                      + ", not submitted again")
        for batch in batches:
            flags = sbatch_flags(batch.config, len(batch.nodes), batch.folder, batch.name,
                                 ["{" + ref + "}" for ref in batch.after])
            print(f"[{label}] {batch.key}: sbatch {show_flags(flags)}")
            for index, node in enumerate(batch.nodes):
                task = f" (array task {index})" if len(batch.nodes) > 1 else ""
                print(f"[{label}] {node.name}{task}: python -m {shlex.join(step_command(node.step, node.argv))}")
        return
    for node in nodes:
        if node.is_done:
            print(f"[{label}] {node.name}: done before, skipped")
            continue
        print(f"[{label}] {node.name}: after {', '.join(node.needs) or 'nothing'}")
        print(f"[{label}] {node.name}: python -m {shlex.join(step_command(node.step, node.argv))}")


def run_graph(nodes, executor_config, root: Path, dry_run: bool, label: str, report_dirs: list[str],
              baseline: str | None = None, pooled: list[str] = ()) -> dict:
    """Print the graph (dry run), submit it to SLURM as one dependency graph and return, or run its steps here
    (`run_local`; the last node is the report, built in this process) and return the report."""
    if dry_run:
        describe_graph(nodes, executor_config, root, label)
        return {}
    if executor_config.cluster == "slurm":
        from slurm import graph
        graph.submit(nodes, executor_config, root)
        print(f"[{label}] submitted to SLURM as one dependency graph; manifest {root / graph.MANIFEST}\n"
              f"[{label}] follow it with: python -m slurm status {root}")
        return {}
    from slurm.executor import local_slots
    started = time.time()
    times = run_local(nodes[:-1], executor_config, label)
    from transfer.report import build_report
    report = build_report(report_dirs, root / "report", baseline=baseline, pooled=pooled)
    total = time.time() - started
    timing = {"total_s": round(total, 1), "parallel_jobs": local_slots(executor_config),
              "threads_per_job": executor_config.threads_per_job, "jobs": times}
    (root / "report" / "timings.json").write_text(json.dumps(timing, indent=2))
    print(f"[{label}] done in {total / 60:.1f} min; report: {root / 'report' / 'report.md'}")
    return report
