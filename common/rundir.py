"""Run-dir bookkeeping shared by pretraining and every transfer task, each piece written once.

A run dir holds the config it was started with (config.yaml), the run's log (log.txt) and its
results. A rerun with the same config resumes or reports; a different config is refused before
anything is written."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from common.config import config_differences, save_config
from common.errors import UserError
from common.files import atomic_torch_save

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def refuse_other_config(
    run_dir: Path, config: DictConfig, may_change: set[str], what: str = ""
) -> None:
    """UserError when run_dir/config.yaml exists and differs from `config` outside the keys in
    `may_change`."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.exists():
        return
    differences = config_differences(
        OmegaConf.to_container(OmegaConf.load(saved)),
        OmegaConf.to_container(config, resolve=True),
        may_change,
    )
    if differences:
        raise UserError(
            f"run dir {run_dir} holds a {what + ' ' if what else ''}run of another config (differs "
            f"at "
            f"{', '.join(differences[:5])}); choose another run_dir or remove that one"
        )


def start_run_dir(run_dir: Path, config: DictConfig) -> None:
    """Create the run dir and write its config.yaml, once (a resumed run keeps the first one)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config.yaml").exists():
        save_config(config, run_dir / "config.yaml")


def attach_log(logger: logging.Logger, run_dir: Path | None) -> logging.Handler | None:
    """Log INFO and above to run_dir/log.txt (timestamped; not when run_dir is None) and to stderr
    (bare);
    return the file handler."""
    handler = None
    if run_dir is not None:
        handler = logging.FileHandler(Path(run_dir) / "log.txt")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
    if not any(
        isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr
        for h in logger.handlers
    ):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    logger.setLevel(logging.INFO)
    return handler


def detach_log(logger: logging.Logger, handler: logging.Handler) -> None:
    logger.removeHandler(handler)
    handler.close()


def pick_device(name: str | None):
    """cuda (this process's GPU) when asked for or available, else cpu; device=cuda without a GPU
    is refused."""
    if name in (None, "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if name == "cuda":
        raise UserError("device=cuda but no GPU is visible; set device=cpu or run on a GPU node")
    return torch.device("cpu")


class Progress:
    """A resumable training state in one file: {counter: n, name: module/optimizer/schedule state,
    ...}.

    `restore` loads what `save` wrote into the same objects and returns the counter (0 without a
    file)."""

    def __init__(self, path: Path, counter: str = "step", **stateful: Any):
        self.path, self.counter, self.stateful = Path(path), counter, stateful

    def restore(self) -> int:
        if not self.path.exists():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        for name, obj in self.stateful.items():
            obj.load_state_dict(state[name])
        return int(state[self.counter])

    def save(self, position: int) -> None:
        atomic_torch_save(
            {
                self.counter: position,
                **{name: obj.state_dict() for name, obj in self.stateful.items()},
            },
            self.path,
        )


class RunDirLock:
    """One writer per run dir: an advisory lock (flock) on RUN_DIR/.lock, held for the run's life.

    The file records the holder (host, pid, SLURM job id, start time). A second writer is refused
    with a UserError naming the holder. The kernel drops the lock when its process dies, so a
    requeued job takes over a lock left by a killed one; the file's stale record is then replaced
    (and logged)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None
        # the previous holder, when it died holding the lock
        self.taken_over_from: str | None = None

    def log_takeover(self, logger: logging.Logger) -> None:
        if self.taken_over_from:
            logger.info(
                "run dir %s: taking over from %s (no longer running)",
                self.path.parent,
                self.taken_over_from,
            )

    @staticmethod
    def holder() -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    @staticmethod
    def describe(record: dict[str, Any]) -> str:
        job = f", SLURM job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
        return f"pid {record.get('pid')} on {record.get('host')}{job}, since {record.get('since')}"

    def acquire(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            previous = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            try:
                who = self.describe(json.loads(previous))
            except ValueError:
                who = "another process"
            raise UserError(
                f"run dir {self.path.parent} is in use by {who}; wait for that run to end, or "
                f"choose "
                "another run_dir"
            ) from None
        stale = os.read(fd, 4096).decode(errors="replace").strip()
        try:
            self.taken_over_from = self.describe(json.loads(stale)) if stale else None
        except ValueError:
            self.taken_over_from = "an unknown process"
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(self.holder()).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
