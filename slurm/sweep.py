"""Sweeps: a job array over backbones x tasks x seeds (x override sets), its manifest, status and results.

The manifest RUN_ROOT/sweep.json lists every job: task, backbone, seed, overrides, run dir, job id, and the
executor folder; `status` and `collect` read nothing else.
"""
from __future__ import annotations

import itertools
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

from pretrain.checks import NON_NEGATIVE, Rule, checked, each
from pretrain.errors import UserError
from pretrain.io import atomic_write_bytes


def _known_tasks(value) -> bool:
    from transfer.tasks import task_of
    return isinstance(value, dict) and all(task_of(key) for key in value)


@dataclass
class SweepConfig:
    run_root: str = "runs/sweep"
    backbones: list = checked([], Rule("a list of [NAME=]checkpoint paths or [NAME=]random:ARCH",
                                       lambda v: isinstance(v, list) and all(isinstance(b, str) for b in v)))
    tasks: dict = checked({}, Rule("a mapping of registered tasks (or TASK/LABEL) to config files", _known_tasks))
    seeds: list = checked([0], each(NON_NEGATIVE))
    overrides: list = checked([[]], Rule("a list of override lists, e.g. [[], [linear.lr=0.1]]",
                                         lambda v: isinstance(v, list) and v and all(isinstance(o, list) for o in v)))


def plan(config: SweepConfig) -> list[dict]:
    if not config.backbones or not config.tasks:
        raise UserError("a sweep needs at least one backbone (backbones: [...]) and one task (tasks: {task: config})")
    from transfer.names import split_named
    from transfer.tasks import TASKS, task_of
    unknown = sorted(key for key in config.tasks if not task_of(key))
    if unknown:
        raise UserError(f"unknown sweep tasks {unknown}; choose from {', '.join(TASKS)}")
    named: dict[str, str] = {}
    for backbone in config.backbones:
        name = split_named(backbone)[0]
        if name in named:
            raise UserError(f"backbones {named[name]} and {backbone} are both named '{name}'; name them apart with "
                            "NAME=PATH")
        named[name] = backbone
    jobs = []
    for (task, task_config), backbone, seed, (index, overrides) in itertools.product(
            config.tasks.items(), config.backbones, config.seeds, enumerate(config.overrides)):
        suffix = f"_o{index}" if len(config.overrides) > 1 else ""
        run_dir = Path(config.run_root) / task / split_named(backbone)[0] / f"seed{seed}{suffix}"
        argv = ["--backbone", backbone, "--config", task_config, f"run_dir={run_dir}", f"seed={seed}", *overrides]
        jobs.append({"task": task_of(task), "backbone": backbone, "seed": seed, "overrides": list(overrides),
                     "run_dir": str(run_dir), "argv": argv})
    return jobs


def submit(config: SweepConfig, executor_config) -> list[dict]:
    from slurm.executor import build_executor
    from slurm.jobs import StepJob
    jobs = plan(config)
    root = Path(config.run_root)
    executor = build_executor(executor_config, folder=root / "jobs")
    with executor.batch():
        submitted = [executor.submit(StepJob(job["task"], job["argv"], executor_config.signal_delay_s)) for job in jobs]
    for job, handle in zip(jobs, submitted):
        job.update(job_id=str(handle.job_id), folder=str(root / "jobs"), cluster=executor_config.cluster)
    atomic_write_bytes(root / "sweep.json", json.dumps({"jobs": jobs}, indent=2).encode())
    return jobs


def load_manifest(run_root: str | Path) -> list[dict]:
    path = Path(run_root) / "sweep.json"
    if not path.exists():
        raise UserError(f"{path} does not exist: pass the run_root of a submitted sweep")
    return json.loads(path.read_text())["jobs"]


def job_state(job: dict) -> tuple[str, str]:
    """(state, detail): DONE / FAILED (detail = log path and stderr tail) / the scheduler's state."""
    from submitit.core.utils import JobPaths
    if (Path(job["run_dir"]) / "metrics.json").exists():
        return "DONE", job["run_dir"]
    paths = JobPaths(job["folder"], job_id=job["job_id"])
    if paths.result_pickle.exists():
        with open(paths.result_pickle, "rb") as f:
            outcome, value = pickle.load(f)
        if outcome == "success":
            return "DONE", job["run_dir"]
        stderr = Path(paths.stderr)
        tail = stderr.read_text(errors="replace").strip().splitlines()[-5:] if stderr.exists() else []
        return "FAILED", f"log {stderr}: " + " | ".join(tail)
    if job.get("cluster") == "slurm":
        import submitit
        return submitit.SlurmJob(job["folder"], job["job_id"]).state, ""
    return "RUNNING-OR-LOST", str(paths.stdout)


def wait(jobs: list[dict], poll_s: float = 2.0, timeout_s: float = 24 * 3600) -> None:
    import time
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [job_state(job)[0] for job in jobs]
        if all(s in ("DONE", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL") for s in states):
            return
        time.sleep(poll_s)
