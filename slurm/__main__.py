"""python -m slurm <command> ...: run project steps as submitit jobs, locally or on a SLURM cluster."""
from __future__ import annotations

import sys
from typing import Sequence

from pretrain.cli import run_main, subcommand_parser

# command -> (module, one-line help); see pretrain.cli.subcommand_parser.
COMMANDS = {
    "submit": ("slurm.submit_cli", "run a step (pretrain, export, a transfer task) as a job"),
    "sweep": ("slurm.sweep_cli", "submit a job array over backbones x tasks x seeds"),
    "status": ("slurm.status_cli", "states of a sweep's jobs, with the log tail of failed ones"),
    "collect": ("slurm.collect_cli", "gather a sweep's metrics.json files into one table"),
    "local-cluster": ("slurm.local_cluster_cli", "start a one-node SLURM cluster on this machine (root)"),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = subcommand_parser("python -m slurm", __doc__.split(":", 1)[1].strip(), COMMANDS)
    args = parser.parse_args(argv)
    args.run(args)


def entry() -> None:
    sys.exit(run_main(main))


if __name__ == "__main__":
    entry()
