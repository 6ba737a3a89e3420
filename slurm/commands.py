"""The slurm package's commands: submit, sweep, status, collect, pipeline, evaluate, local-cluster
(arguments +
action)."""

from __future__ import annotations

import argparse
import shlex
import signal
import tempfile
import time
from pathlib import Path

from common.config import load_config
from common.errors import UserError
from slurm import graph, sweep
from slurm.evaluate import EvaluateConfig, evaluate
from slurm.executor import (
    build_executor,
    job_name,
    load_executor_config,
    local_threads,
    report_failure,
    sbatch_script,
    step_config,
)
from slurm.jobs import StepJob
from slurm.pipeline import Pipeline, PipelineConfig
from slurm.steps import Job, get_step, steps
from transfer.report import build_report

# ------------------------------------------------------------------------------------------ submit
# python -m slurm submit STEP [step arguments] [--executor FILE] [executor.KEY=VALUE] [--dry-run]
# [--wait|--no-wait]

SUBMIT_EPILOG = """\
STEP is one of {steps}; every other argument goes to the step as on its own command line.
The executor comes from --executor (default configs/slurm/local.yaml: subprocesses on this machine) with
executor.KEY=VALUE overrides (keys: slurm/executor.py, ExecutorConfig).
examples:
  python -m slurm submit pretrain --config configs/pretrain/fashion_mnist_resnet18.yaml seed=1
  python -m slurm submit pretrain --config configs/pretrain/imagenet_resnet50.yaml \\
      --executor configs/slurm/cluster.yaml executor.partition=gpu executor.nodes=4 --dry-run
Local jobs are waited for by default, SLURM jobs are not (--wait / --no-wait)."""


def submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = SUBMIT_EPILOG.format(steps=", ".join(steps()))
    parser.add_argument("step", help="the step to run as a job")
    parser.add_argument(
        "step_args",
        nargs=argparse.REMAINDER,
        help="arguments of the step, plus this command's flags",
    )


def split_arguments(argv: list[str]) -> tuple[dict, list[str], list[str]]:
    """(our flags, executor.KEY=VALUE overrides, the step's own arguments)."""
    flags, executor_overrides, rest = (
        {"executor": "configs/slurm/local.yaml", "dry_run": False, "wait": None},
        [],
        [],
    )
    items = iter(argv)
    for item in items:
        if item == "--executor":
            flags["executor"] = next(items, None)
        elif item.startswith("--executor="):
            flags["executor"] = item.split("=", 1)[1]
        elif item == "--dry-run":
            flags["dry_run"] = True
        elif item in ("--wait", "--no-wait"):
            flags["wait"] = item == "--wait"
        elif item.startswith("executor."):
            executor_overrides.append(item[len("executor.") :])
        else:
            rest.append(item)
    if flags["executor"] is None:
        raise UserError("--executor needs a file, e.g. --executor configs/slurm/local.yaml")
    return flags, executor_overrides, rest


def run_submit(args: argparse.Namespace) -> None:
    flags, executor_overrides, step_args = split_arguments(args.step_args)
    # refuses an unknown step
    config = step_config(flags["executor"], executor_overrides, args.step)
    job = StepJob(Job.from_argv(args.step, step_args), config.signal_delay_s)
    if flags["dry_run"]:
        command = job.job.command()
        shown = (
            sbatch_script(config, command, name=job_name(config, args.step))
            if config.cluster == "slurm"
            else f"python -m {shlex.join(command)}"
        )
        print(
            f"# {config.cluster} executor, {len(step_args)} step arguments; nothing "
            f"submitted\n{shown}"
        )
        return
    executor = build_executor(config, name=job_name(config, args.step))
    with local_threads(config):
        submitted = executor.submit(job)
    print(
        f"submitted {args.step} as job {submitted.job_id} ({config.cluster}); logs: "
        f"{submitted.paths.stdout}"
    )
    wait = flags["wait"] if flags["wait"] is not None else config.cluster != "slurm"
    if wait:
        try:
            result = submitted.result()
        except Exception:
            raise UserError(report_failure(submitted).replace("\n", " |")) from None
        metrics = (result or {}).get("metrics") if isinstance(result, dict) else None
        print(f"job {submitted.job_id} done" + (f": {metrics}" if metrics else ""))


# ------------------------------------------------------------------------------------------ sweep
# python -m slurm sweep --config SWEEP.yaml [--executor FILE] [executor.KEY=VALUE] [key=value]
# [--wait]

SWEEP_EPILOG = """\
A sweep file names backbones, tasks (task: config file), seeds and override sets; the sweep submits a job array
per task and backbone over the rest (--dry-run prints their sbatch flags and commands), or runs its jobs here with
the local executor, and writes RUN_ROOT/manifest.json. Then:
  python -m slurm status RUN_ROOT      states, and for failed jobs their log and the end of their stderr
  python -m slurm collect RUN_ROOT     one table of every job's metrics.json (the transfer report)"""


def sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = SWEEP_EPILOG
    parser.add_argument(
        "--config", required=True, help="the sweep YAML (keys: slurm/sweep.py SweepConfig)"
    )
    parser.add_argument(
        "--executor", default="configs/slurm/local.yaml", help="executor config (default: local)"
    )
    parser.add_argument(
        "--wait", action="store_true", help="on SLURM, wait for every job, then print their states"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the jobs without submitting")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="sweep keys, or executor.KEY=VALUE"
    )


def run_sweep(args: argparse.Namespace) -> None:
    executor_overrides = [
        o[len("executor.") :] for o in args.overrides if o.startswith("executor.")
    ]
    overrides = [o for o in args.overrides if not o.startswith("executor.")]
    config = load_config(sweep.SweepConfig, args.config, overrides)
    executor_config = load_executor_config(args.executor, executor_overrides)
    sweep.run(config, executor_config, args.dry_run, args.wait)
    if not args.dry_run and (args.wait or executor_config.cluster != "slurm"):
        print_graph_status(config.run_root)


# ------------------------------------------------------------------------------------------ status
# python -m slurm status RUN_ROOT: the state of every job of a sweep; failed ones with their log
# tail.


def status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_root",
        help="the root of a sweep, pipeline or evaluation (the folder of its manifest.json)",
    )


def print_graph_status(root: str) -> int:
    """Every job of a sweep, pipeline or evaluation: DONE, FAILED with its log, NEVER naming the
    failed step it
    waits for, or the scheduler's state; return how many failed or can never run."""
    nodes = graph.load(root)
    states = graph.states(nodes)
    width = max(len(n.name) for n in nodes)
    bad = 0
    for node in nodes:
        state, detail = states[node.name]
        bad += state in graph.FINISHED_BAD or state == "NEVER"
        shown = detail if state != "DONE" else ""
        print(f"{node.name:{width}s}  {node.job_id or '-':>12s}  {state:14s} {shown}".rstrip())
    return bad


def run_status(args: argparse.Namespace) -> None:
    root = Path(args.run_root)
    if not (root / graph.MANIFEST).exists():
        raise UserError(
            f"{root} is not a submitted run: it holds no {graph.MANIFEST}; pass the root the "
            f"sweep, "
            "pipeline or evaluation printed"
        )
    print_graph_status(args.run_root)


# ------------------------------------------------------------------------------------------ collect
# python -m slurm collect RUN_ROOT [--out DIR]: every job's metrics.json in one table (the transfer
# report).


def collect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_root", help="the root of a sweep, pipeline or evaluation")
    parser.add_argument(
        "--out", help="where to write report.md / report.csv (default RUN_ROOT/report)"
    )
    parser.add_argument(
        "--baseline",
        help="the backbone every other is compared with (a name; default: random init)",
    )


def run_collect(args: argparse.Namespace) -> None:
    nodes = graph.load(args.run_root)
    if print_graph_status(args.run_root):
        print("(failed jobs are left out of the table)")
    run_dirs = [
        node.job.run_dir
        for node in nodes
        if get_step(node.step).kind in ("task", "training")
        and node.job.run_dir
        and (Path(node.job.run_dir) / "metrics.json").exists()
    ]
    build_report(
        run_dirs,
        args.out or str(Path(args.run_root) / "report"),
        plots=False,
        baseline=args.baseline,
    )


# ------------------------------------------------------------------------------------------
# local_cluster python -m slurm local-cluster: start a one-node SLURM cluster here and keep it up
# until SIGINT (Ctrl-C) or SIGTERM, which stop its daemons too.


def local_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", help="folder for its config, state and logs (default: a new temp dir)"
    )
    parser.add_argument("--cpus", type=int, help="CPUs the node offers (default: all)")


class Stop(Exception):
    """SIGINT or SIGTERM reached `local-cluster`: stop the cluster, then exit 128 + the signal's
    number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise Stop, once: the clean-up that follows runs to its end. Installed
    explicitly: a job started in the background of a non-interactive shell (`cmd &`) inherits SIGINT
    ignored, and SIGTERM's
    default would kill this process and leave its daemons running."""

    def handler(signum, frame):
        for each in (signal.SIGINT, signal.SIGTERM):
            signal.signal(each, signal.SIG_IGN)
        raise Stop(signum)

    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, handler)


def run_local_cluster(args: argparse.Namespace) -> None:
    from slurm.local_cluster import LocalSlurmCluster

    cluster = LocalSlurmCluster(args.dir or tempfile.mkdtemp(prefix="slurm-"), cpus=args.cpus)
    stop_on_signals()
    try:
        with cluster:  # stops the daemons it started, also when a signal comes while it starts them
            print(
                f"cluster up; in another shell: export SLURM_CONF={cluster.conf}   (Ctrl-C or "
                f"SIGTERM stops it)",
                flush=True,
            )
            while True:
                time.sleep(3600)
    except Stop as stop:
        print(f"{stop}: cluster in {cluster.dir} stopped", flush=True)
        raise SystemExit(128 + stop.signum) from None


# ------------------------------------------------------------------------------------------
# pipeline python -m slurm pipeline --config FILE [key=value ...]: pretrain -> export -> every task
# -> report.


def pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "The demo: configs/pipeline/demo.yaml (Fashion-MNIST pretraining, generated scenes, local "
        "jobs).\n"
        "On a cluster: configs/pipeline/imagenet_cluster.yaml. Keys: "
        "slurm/pipeline.py (PipelineConfig)."
    )
    parser.add_argument("--config", metavar="FILE", help="pipeline YAML")
    parser.add_argument(
        "--dry-run", action="store_true", help="print each job (and its sbatch flags) only"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def run_pipeline(args: argparse.Namespace) -> None:
    Pipeline(load_config(PipelineConfig, args.config, args.overrides), dry_run=args.dry_run).run()


# ------------------------------------------------------------------------------------------
# evaluate python -m slurm evaluate --backbone NAME=PATH ... --task TASK=CONFIG ... [--seeds 0 1 2]:
# runs, then the report.

EVALUATE_EPILOG = """\
examples:
  python -m slurm evaluate --backbone ssl-hsic=runs/fm/checkpoints/last.pt --backbone random:resnet18 \\
      --task linear=configs/transfer/linear_fashion_mnist.yaml --task knn=configs/transfer/linear_fashion_mnist.yaml \\
      --seeds 0 1 2 --root runs/eval
  python -m slurm evaluate --config my_evaluation.yaml --executor configs/slurm/cluster.yaml
Runs whose metrics.json exists are skipped. Keys of --config: slurm/evaluate.py (EvaluateConfig)."""


def evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EVALUATE_EPILOG
    parser.add_argument(
        "--config", metavar="FILE", help="evaluation YAML (the flags below add to it)"
    )
    parser.add_argument(
        "--backbone",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a checkpoint, or random:ARCH; repeat for several",
    )
    parser.add_argument(
        "--task", action="append", default=[], metavar="TASK=CONFIG", help="repeat for several"
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0")
    parser.add_argument("--root", help="where the runs and the report go (default runs/evaluate)")
    parser.add_argument("--executor", help="executor YAML (default: local jobs)")
    parser.add_argument(
        "--baseline", help="the backbone name every other is compared with (default: random init)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print each job (and its sbatch flags) only"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def run_evaluate(args: argparse.Namespace) -> None:
    overrides = list(args.overrides)
    tasks = {}
    for item in args.task:
        task, sep, path = item.partition("=")
        if not sep:
            raise UserError(
                f"--task {item}: expected TASK=CONFIG, e.g. "
                f"knn=configs/transfer/linear_fashion_mnist.yaml"
            )
        tasks[task] = path
    if args.backbone:
        overrides.append(f"backbones=[{','.join(args.backbone)}]")
    if tasks:
        overrides.append("tasks={" + ", ".join(f"{t}: {p}" for t, p in tasks.items()) + "}")
    for key, value in (
        ("seeds", args.seeds and f"[{','.join(map(str, args.seeds))}]"),
        ("root", args.root),
        ("executor", args.executor),
        ("baseline", args.baseline),
    ):
        if value:
            overrides.append(f"{key}={value}")
    evaluate(load_config(EvaluateConfig, args.config, overrides), dry_run=args.dry_run)
