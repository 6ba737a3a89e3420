"""The executor config (configs/slurm/*.yaml), the submitit executor it builds, the sbatch script it would
submit (dry runs) and a failed job's log tail.

One config serves every step of a pipeline: its top-level keys are the defaults, and `profiles` gives each step
(pretrain, export, verify, scenes, each transfer task, report) its own resources over them, e.g.

    profiles:
      pretrain: {nodes: 4, gpus_per_node: 8, tasks_per_node: 8, timeout_min: 4320}
      export: {gpus_per_node: 0, tasks_per_node: 1, cpus_per_task: 8, mem_gb: 32, timeout_min: 60}

`for_step(config, step)` is the config a step's job gets.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pretrain.checks import NON_NEGATIVE, POSITIVE_INT, Rule, checked, greater_than, one_of, optional

CLUSTERS = ("local", "slurm", "debug")
# What a profile may set: the resources of a job (not where its files go, nor which kind of cluster runs it).
PROFILE_KEYS = ("timeout_min", "partition", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb",
                "account", "qos", "constraint", "signal_delay_s", "max_num_timeout", "array_parallelism",
                "additional", "setup")


def profile_steps() -> tuple[str, ...]:
    """The steps a profile can name: every job step, and the report."""
    from slurm.jobs import steps
    return steps()


def _profiles(value) -> bool:
    return (isinstance(value, dict) and all(step in profile_steps() for step in value)
            and all(isinstance(p, dict) and set(p) <= set(PROFILE_KEYS) for p in value.values()))


PROFILES = Rule("a mapping of steps (pretrain, export, verify, scenes, report, or a task) to mappings of "
                f"{', '.join(PROFILE_KEYS)}", _profiles)


@dataclass
class ExecutorConfig:
    cluster: str = checked("local", one_of(*CLUSTERS))  # local: subprocesses here | slurm: sbatch | debug: in-process
    folder: str = "runs/jobs"               # submitit's job files and logs (%j = job id)
    name: str = "ssl-hsic"
    timeout_min: int = checked(60, POSITIVE_INT)
    # SLURM only
    partition: Optional[str] = None
    nodes: int = checked(1, POSITIVE_INT)
    gpus_per_node: int = checked(0, NON_NEGATIVE)
    tasks_per_node: int = checked(1, POSITIVE_INT)                # one task per GPU for distributed training
    cpus_per_task: int = checked(1, POSITIVE_INT)
    mem_gb: Optional[float] = checked(None, optional(greater_than(0)))
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    signal_delay_s: int = checked(90, NON_NEGATIVE)               # SIGUSR2 this long before the time limit: checkpoint + requeue
    max_num_timeout: int = checked(3, NON_NEGATIVE)               # requeues after timeouts (preemptions do not count)
    array_parallelism: int = checked(64, POSITIVE_INT)
    additional: dict = field(default_factory=dict)   # extra sbatch flags, e.g. {exclude: node12}
    setup: list = field(default_factory=list)        # shell lines before the job (module load ...)
    profiles: dict = checked({}, PROFILES)              # step -> resources over the keys above (see the docstring)


def for_step(config, step: str):
    """The executor config of one step's job: the defaults with the step's profile over them, checked."""
    from omegaconf import OmegaConf
    from pretrain.checks import check_config
    from pretrain.errors import UserError
    if step not in profile_steps():
        raise UserError(f"unknown step '{step}'; choose one of {', '.join(profile_steps())}")
    from omegaconf.errors import OmegaConfBaseException
    profile = (config.profiles or {}).get(step) or {}
    profile = OmegaConf.to_container(profile) if OmegaConf.is_config(profile) else dict(profile)
    try:
        merged = OmegaConf.merge(config, profile)
        check_config(merged, ExecutorConfig)
    except (UserError, OmegaConfBaseException) as error:
        message = str(error).splitlines()[0].removeprefix("error: ")
        raise UserError(f"executor profile '{step}': {message}") from None
    return merged


def slurm_parameters(config: ExecutorConfig) -> dict:
    """submitit's slurm_* parameters for this config."""
    params = dict(slurm_partition=config.partition, nodes=config.nodes, gpus_per_node=config.gpus_per_node or None,
                  tasks_per_node=config.tasks_per_node, cpus_per_task=config.cpus_per_task,
                  slurm_account=config.account, slurm_qos=config.qos, slurm_constraint=config.constraint,
                  slurm_signal_delay_s=config.signal_delay_s,
                  slurm_array_parallelism=config.array_parallelism,
                  slurm_additional_parameters=dict(config.additional) or None, slurm_setup=list(config.setup) or None)
    if config.mem_gb:
        params["mem_gb"] = config.mem_gb
    return {k: v for k, v in params.items() if v is not None}


def build_executor(config: ExecutorConfig, folder: str | Path | None = None):
    import submitit
    extra = {"slurm_max_num_timeout": config.max_num_timeout} if config.cluster == "slurm" else {}
    executor = submitit.AutoExecutor(folder=str(folder or config.folder), cluster=config.cluster, **extra)
    executor.update_parameters(name=config.name, timeout_min=config.timeout_min)
    if config.cluster == "slurm":
        executor.update_parameters(**slurm_parameters(config))
    return executor


def sbatch_script(config: ExecutorConfig, argv: list[str]) -> str:
    """The sbatch script submitit would write for a job running `argv` (shown by --dry-run)."""
    executor = build_executor(config)
    command = f"{sys.executable} -u -m submitit.core._submit '{config.folder}'"
    text = executor._executor._make_submission_file_text(command, "DRYRUN")
    return text + f"\n# inside that job, submitit runs: python -m {shlex.join(argv)}\n"


def load_executor_config(path: str, overrides: list[str]):
    from pretrain.config import load_config
    return load_config(ExecutorConfig, path, overrides)


def step_command(step: str, argv: list[str]) -> list[str]:
    """The `python -m` arguments of a step: pretrain, or a transfer command."""
    return ["pretrain", *argv] if step == "pretrain" else ["transfer", step, *argv]


def describe(config: ExecutorConfig, name: str, step: str, argv: list[str]) -> str:
    """What a dry run prints for one job: its sbatch flags on SLURM, then its command line."""
    command = step_command(step, argv)
    lines = []
    if config.cluster == "slurm":
        flags = [line.split(" ", 1)[1] for line in sbatch_script(config, command).splitlines()
                 if line.startswith("#SBATCH")]
        lines.append(f"{name}: sbatch {' '.join(flags)}")
    lines.append(f"{name}: python -m {shlex.join(command)}")
    return "\n".join(lines)


def report_failure(job) -> str:
    """The job's log path and the last lines of its stderr."""
    stderr = Path(job.paths.stderr)
    tail = stderr.read_text(errors="replace").strip().splitlines()[-3:] if stderr.exists() else ["(no stderr yet)"]
    return f"job {job.job_id} failed; log {stderr}\n" + "\n".join("    " + line for line in tail)
