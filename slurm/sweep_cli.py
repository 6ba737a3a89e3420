"""python -m slurm sweep --config SWEEP.yaml [--executor FILE] [executor.KEY=VALUE] [key=value] [--wait]"""
from __future__ import annotations

import argparse

EPILOG = """\
A sweep file names backbones, tasks (task: config file), seeds and override sets; the sweep submits one job
array over all combinations and writes RUN_ROOT/sweep.json. Then:
  python -m slurm status RUN_ROOT      states, and for failed jobs their log and the end of their stderr
  python -m slurm collect RUN_ROOT     one table of every job's metrics.json (the transfer report)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--config", required=True, help="the sweep YAML (keys: slurm/sweep.py SweepConfig)")
    parser.add_argument("--executor", default="configs/slurm/local.yaml", help="executor config (default: local)")
    parser.add_argument("--wait", action="store_true", help="wait for every job, then print their states")
    parser.add_argument("--dry-run", action="store_true", help="list the jobs without submitting")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="sweep keys, or executor.KEY=VALUE")


def run(args: argparse.Namespace) -> None:
    from pretrain.config import load_config
    from slurm import sweep
    from slurm.submit_cli import load_executor_config
    executor_overrides = [o[len("executor."):] for o in args.overrides if o.startswith("executor.")]
    overrides = [o for o in args.overrides if not o.startswith("executor.")]
    config = load_config(sweep.SweepConfig, args.config, overrides)
    executor_config = load_executor_config(args.executor, executor_overrides)
    if args.dry_run:
        for job in sweep.plan(config):
            print(f"{job['task']:13s} seed {job['seed']}  {job['backbone']}  -> {job['run_dir']}")
        return
    jobs = sweep.submit(config, executor_config)
    print(f"submitted {len(jobs)} jobs ({executor_config.cluster}); manifest {config.run_root}/sweep.json")
    if args.wait:
        sweep.wait(jobs)
        print_status(config.run_root)


def print_status(run_root: str) -> int:
    from slurm import sweep
    failed = 0
    for job in sweep.load_manifest(run_root):
        state, detail = sweep.job_state(job)
        failed += state == "FAILED"
        print(f"{job['job_id']:>10s}  {state:16s} {job['task']:13s} seed {job['seed']}  {job['backbone']}"
              + (f"\n            {detail}" if state == "FAILED" else ""))
    return failed
