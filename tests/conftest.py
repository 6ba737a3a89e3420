"""Shared fixtures. The SLURM cluster is real: Debian's daemons, started once per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster (this host), up for the whole session; SLURM_CONF points clients at it."""
    import signal
    from slurm.local_cluster import LocalSlurmCluster

    def interrupt(signum, frame):  # a terminated test run still stops its cluster (teardown runs)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    cluster.stop()
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m <args>` in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout)
