"""python -m slurm <command> ...: run project steps as submitit jobs, locally or on a SLURM
cluster."""

from __future__ import annotations

import sys
from typing import Sequence

from common.cli import run_main, subcommand_parser
from slurm import commands as c

# command -> (one-line help, add_arguments, run)
COMMANDS = {
    "submit": (
        "run a step (pretrain, export, a transfer task) as a job",
        c.submit_arguments,
        c.run_submit,
    ),
    "sweep": ("submit job arrays over backbones x tasks x seeds", c.sweep_arguments, c.run_sweep),
    "status": (
        "states of a sweep's or a SLURM pipeline's jobs, with the log tail of failed ones",
        c.status_arguments,
        c.run_status,
    ),
    "collect": (
        "gather a sweep's metrics.json files into one table",
        c.collect_arguments,
        c.run_collect,
    ),
    "pipeline": (
        "the main job: pretrain, export, every task vs random init, report",
        c.pipeline_arguments,
        c.run_pipeline,
    ),
    "evaluate": (
        "named backbones x tasks x seeds, then the report that compares them",
        c.evaluate_arguments,
        c.run_evaluate,
    ),
    "local-cluster": (
        "start a one-node SLURM cluster on this machine (root)",
        c.local_cluster_arguments,
        c.run_local_cluster,
    ),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = subcommand_parser("python -m slurm", __doc__.split(":", 1)[1].strip(), COMMANDS)
    args = parser.parse_args(argv)
    args.run(args)


def entry() -> None:
    sys.exit(run_main(main))


if __name__ == "__main__":
    entry()
