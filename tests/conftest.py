"""The suite's fixtures and its grouping on pytest-xdist workers: the SLURM cluster (real: Debian's
daemons, started
once per test session), the generated scenes, a busy core. Plain helpers live in tests/helpers.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from transfer.scenes import write_all

# The suite runs on two pytest-xdist workers (pytest.ini: -n 2) on one thread each, and so does
# every process a test starts (the variable is inherited): two workers on two threads each would be
# four busy-waiting OpenMP threads on two cores, many times slower. Also with -n 0, so that a test's
# numbers do not depend on how it was run. Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# before pytest-xdist's own, which reads the groups into the test ids
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Which tests share a worker (--dist loadgroup): those on the SLURM cluster (one cluster; their
    jobs do not compete for its two CPUs), and those of one module that share a module-scoped
    fixture (computed once); and
    the order in which they are handed out."""
    for item in items:
        definitions = getattr(item, "_fixtureinfo", None)
        scopes = {
            name: defs[-1].scope
            for name, defs in (definitions.name2fixturedefs.items() if definitions else ())
        }
        if item.get_closest_marker("xdist_group"):
            continue
        if "slurm_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif "module" in scopes.values():
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    # The long ones first (the SLURM group, then tests marked slow), so that no worker starts one
    # near the end.
    items.sort(
        key=lambda item: (
            "slurm_cluster" not in item.fixturenames,
            item.get_closest_marker("slow") is None,
        )
    )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster (this host), up for the whole session; SLURM_CONF points clients
    at it."""
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


@pytest.fixture(scope="session")
def scenes(tmp_path_factory):
    """Generated scenes in every layout (16 train, 6 val, 96 px): what the dense-task tests read."""

    out = tmp_path_factory.mktemp("scenes")
    write_all(out, 16, 6, 96, 3)
    return out


@pytest.fixture
def cpu_burner():
    """A process that keeps one core busy (at most 15 minutes), stopped when the test ends: a
    loaded machine."""
    burner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nend = time.time() + 900\nwhile time.time() < end:\n    pass",
        ]
    )
    yield burner
    burner.kill()
    burner.wait()
