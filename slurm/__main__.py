"""python -m slurm <command> ...: run project steps as submitit jobs, locally or on a SLURM cluster."""
from __future__ import annotations

import sys
from typing import Sequence

from pretrain.cli import run_main, subcommand_parser

# command -> (module, one-line help); see pretrain.cli.subcommand_parser.
COMMANDS = {
    "local-cluster": ("slurm.local_cluster_cli", "start a one-node SLURM cluster on this machine (root)"),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = subcommand_parser(f"python -m slurm", __doc__.split(":", 1)[1].strip(), COMMANDS)
    args = parser.parse_args(argv)
    args.run(args)


def entry() -> None:
    sys.exit(run_main(main))


if __name__ == "__main__":
    entry()
