"""python -m slurm collect RUN_ROOT [--out DIR]: every job's metrics.json in one table (the transfer report)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_root", help="the run_root of a submitted sweep")
    parser.add_argument("--out", help="where to write report.md / report.csv (default RUN_ROOT/report)")


def run(args: argparse.Namespace) -> None:
    from pathlib import Path
    from slurm import sweep
    from slurm.sweep_cli import print_status
    from transfer.report import build_report
    jobs = sweep.load_manifest(args.run_root)
    if print_status(args.run_root):
        print("(failed jobs are left out of the table)")
    run_dirs = [job["run_dir"] for job in jobs if (Path(job["run_dir"]) / "metrics.json").exists()]
    build_report(run_dirs, args.out or str(Path(args.run_root) / "report"), plots=False)
