"""A real one-node SLURM cluster on this machine, configured in a temporary directory.

It runs Debian's munged, slurmctld and slurmd (as root) with every file, port and socket private to
the directory, so it touches no system SLURM. The tests start one per session; a person can try jobs
on it:

    python -m slurm local-cluster --dir /tmp/cluster       # starts it, prints `export SLURM_CONF=...`

SIGINT (Ctrl-C) or SIGTERM stops it with its daemons (also when it runs in the background, `... &`);
SIGKILL cannot be caught and leaves them running (find them by the folder: pgrep -af DIR).

Clients (sbatch, squeue, submitit) reach it through the SLURM_CONF environment variable.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from common.errors import UserError

DAEMONS = ("munged", "slurmctld", "slurmd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _total_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


class LocalSlurmCluster:
    """One node (this host) that is controller and compute node at once, partition 'debug'."""

    def __init__(self, directory: str | Path, cpus: int | None = None):
        self.dir = Path(directory).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self._processes: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment that points SLURM clients at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _check_prerequisites(self) -> None:
        missing = [
            d
            for d in DAEMONS + ("sbatch", "scontrol")
            if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()
        ]
        if missing:
            raise UserError(
                f"SLURM programs {missing} are missing: install Debian's munge, slurmctld, slurmd "
                "and slurm-client (scripts/install.sh does)"
            )
        if os.geteuid() != 0:
            raise UserError("the local SLURM cluster runs its daemons as root; run it as root")

    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir / "munge", 0o700)
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        memory = max(1024, _total_memory_mb() - 2048)
        self.conf.write_text(f"""\
ClusterName=sslhsic-local
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={self.dir}/state
SlurmdSpoolDir={self.dir}/spool
SlurmctldPidFile={self.dir}/slurmctld.pid
SlurmdPidFile={self.dir}/slurmd.pid
SlurmctldLogFile={self.dir}/log/slurmctld.log
SlurmdLogFile={self.dir}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=600
NodeName={self.host} CPUs={self.cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def start(self, timeout_s: float = 60) -> "LocalSlurmCluster":
        self._check_prerequisites()
        self._write_config()
        log = self.dir / "log"
        self._spawn(
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={self.dir}/munge/munge.key",
                f"--pid-file={self.dir}/munge/munged.pid",
                f"--seed-file={self.dir}/munge/munged.seed",
                f"--log-file={log}/munged.log",
            ]
        )
        self._wait(
            lambda: self.munge_socket.exists(), timeout_s, "munged did not create its socket"
        )
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(
            lambda: (
                self.scontrol("ping", check=False).returncode == 0
                and "UP" in self.scontrol("ping", check=False).stdout
            ),
            timeout_s,
            "slurmctld did not answer ping",
        )
        self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", self.host])
        self._wait(self._node_ready, timeout_s, "slurmd did not register its node")
        return self

    def _spawn(self, argv: list[str]) -> None:
        name = argv[0]
        with open(self.dir / "log" / f"{name}.stdout", "ab") as out:
            self._processes.append(
                subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
                )
            )

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for proc in self._processes:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{proc.args[0]} exited with {proc.returncode}; "
                        f"see {self.dir}/log: {self.log_tail()}"
                    )
            if ready():
                return
            time.sleep(0.25)
        raise RuntimeError(
            f"{what} within {timeout_s:.0f} s; see {self.dir}/log: {self.log_tail()}"
        )

    def _node_ready(self) -> bool:
        out = self.scontrol("show", "node", self.host, check=False).stdout
        return "State=IDLE" in out or "State=MIXED" in out or "State=ALLOCATED" in out

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["scontrol", *args], env=self.env, capture_output=True, text=True, check=check
        )

    def log_tail(self, lines: int = 5) -> str:
        tails = []
        for path in sorted((self.dir / "log").glob("*.log")):
            text = path.read_text(errors="replace").strip().splitlines()[-lines:]
            if text:
                tails.append(f"{path.name}: " + " | ".join(text))
        return " ; ".join(tails)

    def cancel_jobs(self, timeout_s: float = 30) -> None:
        """Cancel every job and wait for them to leave: a job must not outlive its cluster."""
        jobs = subprocess.run(
            ["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True
        ).stdout.split()
        if not jobs:
            return
        subprocess.run(["scancel", *jobs], env=self.env, capture_output=True)
        deadline = time.monotonic() + timeout_s
        while (
            time.monotonic() < deadline
            and subprocess.run(
                ["squeue", "-h"], env=self.env, capture_output=True, text=True
            ).stdout.strip()
        ):
            time.sleep(0.5)

    def stop(self) -> None:
        if self._processes:
            self.cancel_jobs()
        for proc in reversed(self._processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self._processes):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._processes.clear()

    def __enter__(self) -> "LocalSlurmCluster":
        try:
            return self.start()
        except BaseException:  # a failed or interrupted start leaves no daemon behind
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
