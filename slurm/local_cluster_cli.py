"""python -m slurm local-cluster: start a one-node SLURM cluster here and keep it up until Ctrl-C."""
from __future__ import annotations

import argparse
import tempfile
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", help="folder for its config, state and logs (default: a new temp dir)")
    parser.add_argument("--cpus", type=int, help="CPUs the node offers (default: all)")


def run(args: argparse.Namespace) -> None:
    from slurm.local_cluster import LocalSlurmCluster
    cluster = LocalSlurmCluster(args.dir or tempfile.mkdtemp(prefix="slurm-"), cpus=args.cpus)
    with cluster:
        print(f"cluster up; in another shell: export SLURM_CONF={cluster.conf}   (Ctrl-C stops it)", flush=True)
        while True:
            time.sleep(3600)
