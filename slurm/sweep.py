"""Sweeps: backbones x tasks x seeds (x override sets) as job arrays (one per task and backbone, sized by the
task's profile and named after it: ssl-hsic:knn/random-resnet18), the manifest, status and results.

The manifest RUN_ROOT/sweep.json lists every job: task, backbone, seed, overrides, run dir, job id, and the
executor folder; `status` and `collect` read nothing else.
"""
from __future__ import annotations

import itertools
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.checks import NON_NEGATIVE, Rule, checked, each
from common.errors import UserError
from common.files import atomic_write_bytes


def _known_tasks(value) -> bool:
    from transfer.tasks import task_of
    return isinstance(value, dict) and all(task_of(key) for key in value)


def _distinct_seeds(value) -> bool:
    """A non-empty list of integers >= 0, each once; a repeated seed raises a UserError naming it (it would plan
    the same runs twice, into one run dir)."""
    if not each(NON_NEGATIVE).test(value):
        return False
    repeated = next((seed for seed in value if value.count(seed) > 1), None)
    if repeated is not None:
        distinct = list(dict.fromkeys(value))
        raise UserError(f"config key 'seeds' is {value}; seed {repeated} appears {value.count(repeated)} times: "
                        f"list each seed once, e.g. {distinct}")
    return True


SEEDS = Rule("a list of distinct integers >= 0", _distinct_seeds)


@dataclass
class SweepConfig:
    run_root: str = "runs/sweep"
    backbones: list = checked([], Rule("a list of [NAME=]checkpoint paths or [NAME=]random:ARCH",
                                       lambda v: isinstance(v, list) and all(isinstance(b, str) for b in v)))
    tasks: dict = checked({}, Rule("a mapping of registered tasks (or TASK/LABEL) to config files", _known_tasks))
    seeds: list = checked([0], SEEDS)
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
                     "run_dir": str(run_dir), "argv": argv, "group": f"{task}/{split_named(backbone)[0]}"})
    return jobs


def batches(config: SweepConfig, executor_config) -> list[tuple[str, Any, list[dict]]]:
    """The sweep's sbatch calls: (key, the task's executor config, jobs), one job array per task and backbone over
    its seeds and override sets, sized by the task's profile and named after the key (ssl-hsic:knn/random-resnet18)."""
    from slurm.executor import for_step
    groups: dict[str, list[dict]] = {}
    for job in plan(config):
        groups.setdefault(job["group"], []).append(job)
    return [(key if len(jobs) > 1 else Path(jobs[0]["run_dir"]).relative_to(config.run_root).as_posix(),
             for_step(executor_config, jobs[0]["task"]), jobs) for key, jobs in groups.items()]


def submit(config: SweepConfig, executor_config) -> list[dict]:
    from slurm.executor import build_executor, job_name, local_threads
    from slurm.jobs import StepJob
    root = Path(config.run_root)
    jobs = []
    for key, step_config, group in batches(config, executor_config):
        executor = build_executor(step_config, folder=root / "jobs", name=job_name(step_config, key))
        with local_threads(step_config), executor.batch():
            submitted = [executor.submit(StepJob(job["task"], job["argv"], step_config.signal_delay_s))
                         for job in group]
        for job, handle in zip(group, submitted):
            job.update(job_id=str(handle.job_id), folder=str(root / "jobs"), cluster=executor_config.cluster)
        jobs += group
    atomic_write_bytes(root / "sweep.json", json.dumps({"jobs": jobs}, indent=2).encode())
    return jobs


def load_manifest(run_root: str | Path) -> list[dict]:
    path = Path(run_root) / "sweep.json"
    if not path.exists():
        raise UserError(f"{path} does not exist: pass the run_root of a submitted sweep")
    try:
        jobs = json.loads(path.read_text())["jobs"]
        if not all(isinstance(job, dict) and {"task", "run_dir", "job_id", "folder"} <= set(job) for job in jobs):
            raise ValueError("a job lacks task, run_dir, job_id or folder")
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a sweep manifest ({type(error).__name__}: {error}); resubmit the sweep to "
                        "write it again") from None
    return jobs


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
