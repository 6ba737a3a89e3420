"""python -m slurm status RUN_ROOT: the state of every job of a sweep; failed ones with their log tail."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_root", help="the run_root of a submitted sweep")


def run(args: argparse.Namespace) -> None:
    from slurm.sweep_cli import print_status
    print_status(args.run_root)
