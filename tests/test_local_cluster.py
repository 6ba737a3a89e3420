"""`python -m slurm local-cluster` stops on SIGTERM and on SIGINT, also started in the background of
a script (where SIGINT comes ignored), and takes its daemons with it.

Each test starts its own cluster in its own folder (its own ports, sockets, state and pid files), so
it runs beside the session's `slurm_cluster` and other runs' clusters; it finds its daemons by that
folder and leaves the others alone (checked)."""

import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT

# On the SLURM tests' worker (pytest-xdist): the session's cluster stays up for the whole test, as
# the last assertion expects of every other cluster.
pytestmark = pytest.mark.xdist_group("slurm")


def processes_naming(text: str) -> dict[int, str]:
    """pid -> command line of every process whose command line holds `text`."""
    out = subprocess.run(["pgrep", "-af", text], capture_output=True, text=True).stdout
    return {int(line.split(" ", 1)[0]): line.split(" ", 1)[1] for line in out.splitlines()}


def daemons_of_other_clusters(folder) -> dict[int, str]:
    return {
        pid: cmd
        for pid, cmd in processes_naming("slurmctld|slurmd|munged").items()
        if str(folder) not in cmd
    }


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_local_cluster_stops_with_its_daemons_on_sigterm_and_sigint(signum, tmp_path):
    folder = tmp_path / "cluster"
    others = daemons_of_other_clusters(folder)
    # as `python -m slurm local-cluster ... &` in a script: the shell starts a background job with
    # SIGINT ignored
    background = signum == signal.SIGINT
    process = subprocess.Popen(
        [sys.executable, "-m", "slurm", "local-cluster", "--dir", str(folder), "--cpus", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None,
    )
    try:
        first = process.stdout.readline()  # "cluster up; ..." once every daemon answers
        assert first.startswith(
            f"cluster up; in another shell: export SLURM_CONF={folder}/slurm.conf"
        ), first + process.stderr.read() if process.poll() is not None else first
        daemons = processes_naming(str(folder))
        assert sorted(cmd.split()[0] for pid, cmd in daemons.items() if pid != process.pid) == [
            "munged",
            "slurmctld",
            "slurmd",
        ]
        started = time.monotonic()
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 128 + signum, err
        assert out == f"{signal.Signals(signum).name}: cluster in {folder} stopped\n" and err == ""
        assert time.monotonic() - started < 30
        assert processes_naming(str(folder)) == {}  # no daemon of this cluster is left
        for pid in daemons:  # nor a zombie: each was reaped, its pid is free
            assert subprocess.run(["ps", "-p", str(pid)], capture_output=True).returncode == 1
    finally:  # a failed test leaves nothing running either
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in processes_naming(str(folder)):
            subprocess.run(["kill", "-KILL", str(pid)], capture_output=True)
    assert {
        pid: cmd for pid, cmd in daemons_of_other_clusters(folder).items() if pid in others
    } == others
