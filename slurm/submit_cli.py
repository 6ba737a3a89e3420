"""python -m slurm submit STEP [step arguments] [--executor FILE] [executor.KEY=VALUE] [--dry-run] [--wait|--no-wait]"""
from __future__ import annotations

import argparse

EPILOG = """\
STEP is pretrain, export, verify, linear, knn, depth, segmentation or detection; every other argument goes to
the step as on its own command line. The executor comes from --executor (default configs/slurm/local.yaml:
subprocesses on this machine) with executor.KEY=VALUE overrides (keys: slurm/schema.py).
examples:
  python -m slurm submit pretrain --config configs/pretrain/fashion_mnist_resnet18.yaml seed=1
  python -m slurm submit pretrain --config configs/pretrain/imagenet_resnet50.yaml \\
      --executor configs/slurm/cluster.yaml executor.partition=gpu executor.nodes=4 --dry-run
Local jobs are waited for by default, SLURM jobs are not (--wait / --no-wait)."""

OWN_FLAGS = ("--executor", "--dry-run", "--wait", "--no-wait")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("step", help="the step to run as a job")
    parser.add_argument("step_args", nargs=argparse.REMAINDER, help="arguments of the step, plus this command's flags")


def split_arguments(argv: list[str]) -> tuple[dict, list[str], list[str]]:
    """(our flags, executor.KEY=VALUE overrides, the step's own arguments)."""
    flags, executor_overrides, rest = {"executor": "configs/slurm/local.yaml", "dry_run": False, "wait": None}, [], []
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
            executor_overrides.append(item[len("executor."):])
        else:
            rest.append(item)
    if flags["executor"] is None:
        from pretrain.errors import UserError
        raise UserError("--executor needs a file, e.g. --executor configs/slurm/local.yaml")
    return flags, executor_overrides, rest


def load_executor_config(path: str, overrides: list[str]):
    from pretrain.config import load_config
    from slurm.schema import ExecutorConfig
    return load_config(ExecutorConfig, path, overrides)


def report_failure(job) -> str:
    """The job's log path and the last lines of its stderr."""
    from pathlib import Path
    stderr = Path(job.paths.stderr)
    tail = stderr.read_text(errors="replace").strip().splitlines()[-3:] if stderr.exists() else ["(no stderr yet)"]
    return f"job {job.job_id} failed; log {stderr}\n" + "\n".join("    " + line for line in tail)


def run(args: argparse.Namespace) -> None:
    from pretrain.errors import UserError
    from slurm.executor import build_executor, sbatch_script
    from slurm.jobs import StepJob
    flags, executor_overrides, step_args = split_arguments(args.step_args)
    config = load_executor_config(flags["executor"], executor_overrides)
    job = StepJob(args.step, step_args)
    module = "pretrain" if args.step == "pretrain" else f"transfer {args.step}"
    if flags["dry_run"]:
        print(f"# {config.cluster} executor, {len(step_args)} step arguments; nothing submitted")
        if config.cluster == "slurm":
            print(sbatch_script(config, [*module.split(), *step_args]))
        else:
            print(f"python -m {module} {' '.join(step_args)}")
        return
    executor = build_executor(config)
    submitted = executor.submit(job)
    print(f"submitted {args.step} as job {submitted.job_id} ({config.cluster}); logs: {submitted.paths.stdout}")
    wait = flags["wait"] if flags["wait"] is not None else config.cluster != "slurm"
    if wait:
        try:
            result = submitted.result()
        except Exception:
            raise UserError(report_failure(submitted).replace("\n", " |")) from None
        metrics = (result or {}).get("metrics") if isinstance(result, dict) else None
        print(f"job {submitted.job_id} done" + (f": {metrics}" if metrics else ""))
