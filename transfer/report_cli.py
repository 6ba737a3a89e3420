"""python -m transfer report RUN_DIRS... --out DIR: the table (md + csv) and plots of finished runs."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", help="run dirs holding metrics.json (pretraining runs give curves)")
    parser.add_argument("--out", required=True, help="folder for report.md, report.csv and the PNG plots")
    parser.add_argument("--no-plots", action="store_true")


def run(args: argparse.Namespace) -> None:
    from transfer.report import build_report
    build_report(args.run_dirs, args.out, plots=not args.no_plots)
