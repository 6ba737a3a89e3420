"""The executor config (configs/slurm/*.yaml), the submitit executor it builds, the sbatch script it
submits (shown by dry runs), job names and a failed job's log tail.

One config serves every step of a pipeline: its top-level keys are the defaults, and `profiles`
gives each step (pretrain, export, verify, scenes, each transfer task, report) its own resources
over them, e.g.

    profiles:
      pretrain: {nodes: 4, gpus_per_node: 8, tasks_per_node: 8, timeout_min: 1440, max_num_timeout: 3}
      export: {gpus_per_node: 0, tasks_per_node: 1, cpus_per_task: 8, mem_gb: 32, timeout_min: 60}

`for_step(config, step)` is the config a step's job gets; every profile is checked when the file
loads. `build_executor` is the one place a job's parameters are set (its name, dependencies,
resources): submissions use it, and dry runs render the sbatch script of the same executor
(`sbatch_script`, `sbatch_flags`), so a dry run prints what is submitted."""

from __future__ import annotations

import os
import shlex
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.checks import (
    NON_NEGATIVE,
    POSITIVE_INT,
    Rule,
    check_config,
    checked,
    greater_than,
    one_of,
    optional,
)
from common.config import closest_key, load_config
from common.errors import UserError
from slurm.steps import steps

CLUSTERS = ("local", "slurm", "debug")
# What a profile may set: the resources of a job (not where its files go, nor which kind of cluster
# runs it).
PROFILE_KEYS = (
    "timeout_min",
    "partition",
    "nodes",
    "gpus_per_node",
    "tasks_per_node",
    "cpus_per_task",
    "mem_gb",
    "account",
    "qos",
    "constraint",
    "signal_delay_s",
    "max_num_timeout",
    "array_parallelism",
    "additional",
    "setup",
)


def profile_steps() -> tuple[str, ...]:
    """The steps a profile can name: every step of the table (slurm.steps), the report included."""
    return tuple(steps())


def _profiles(value) -> bool:
    """True for a mapping of steps to mappings of profile keys; a bad entry raises a UserError
    naming it (the
    step or key that is wrong and the closest right one), which the config check prints as its one
    line."""
    if not isinstance(value, dict):
        return False
    steps = profile_steps()
    for step, profile in value.items():
        if step not in steps:
            raise UserError(
                f"config key 'profiles' has a profile for '{step}', which is no step; did you mean "
                f"'{closest_key(str(step), steps)}'? (steps: {', '.join(steps)})"
            )
        if not isinstance(profile, dict):
            raise UserError(
                f"config key 'profiles.{step}' is {profile!r}; it must be a mapping of "
                f"{', '.join(PROFILE_KEYS)}"
            )
        unknown = sorted(set(profile) - set(PROFILE_KEYS), key=str)
        if unknown:
            raise UserError(
                f"config key 'profiles.{step}' has the unknown key '{unknown[0]}'; did you mean "
                f"'{closest_key(str(unknown[0]), PROFILE_KEYS)}'? (a profile sets "
                f"{', '.join(PROFILE_KEYS)})"
            )
    return True


PROFILES = Rule(
    "a mapping of steps (pretrain, export, verify, scenes, report, or a task) to mappings of "
    f"{', '.join(PROFILE_KEYS)}",
    _profiles,
)


@dataclass
class ExecutorConfig:
    # local: subprocesses here | slurm: sbatch | debug: in-process
    cluster: str = checked("local", one_of(*CLUSTERS))
    folder: str = "runs/jobs"  # submitit's job files and logs (%j = job id)
    name: str = "ssl-hsic"
    timeout_min: int = checked(60, POSITIVE_INT)
    # SLURM only
    partition: Optional[str] = None
    nodes: int = checked(1, POSITIVE_INT)
    gpus_per_node: int = checked(0, NON_NEGATIVE)
    # one task per GPU for distributed training
    tasks_per_node: int = checked(1, POSITIVE_INT)
    cpus_per_task: int = checked(1, POSITIVE_INT)
    mem_gb: Optional[float] = checked(None, optional(greater_than(0)))
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    # SIGUSR2 this long before the time limit: checkpoint + requeue
    signal_delay_s: int = checked(90, NON_NEGATIVE)
    # requeues after timeouts (preemptions do not count)
    max_num_timeout: int = checked(3, NON_NEGATIVE)
    array_parallelism: int = checked(64, POSITIVE_INT)
    additional: dict = field(default_factory=dict)  # extra sbatch flags, e.g. {exclude: node12}
    setup: list = field(default_factory=list)  # shell lines before the job (module load ...)
    # step -> resources over the keys above (see the docstring)
    profiles: dict = checked({}, PROFILES)
    # local only: how many jobs of a graph run at once (0: as many as the cores hold at
    # threads_per_job each), and each job's threads (OMP_NUM_THREADS; unset: torch's default, one
    # per core)
    parallel_jobs: int = checked(1, NON_NEGATIVE)
    threads_per_job: Optional[int] = checked(None, optional(POSITIVE_INT))


def for_step(config, step: str):
    """The executor config of one step's job: the defaults with the step's profile over them,
    checked."""
    if step not in profile_steps():
        raise UserError(f"unknown step '{step}'; choose one of {', '.join(profile_steps())}")
    profile = (config.profiles or {}).get(step) or {}
    profile = OmegaConf.to_container(profile) if OmegaConf.is_config(profile) else dict(profile)
    try:
        merged = OmegaConf.merge(config, profile)
        check_config(merged, ExecutorConfig)
        check_signal_delay(merged)
    except UserError as error:
        raise UserError(f"executor profile '{step}': {error}") from None
    except OmegaConfBaseException as error:  # a value of the wrong type
        key = getattr(error, "full_key", None) or getattr(error, "key", None) or "?"
        raise UserError(
            f"executor profile '{step}': config key '{key}' has the wrong type: "
            f"{str(error).splitlines()[0]}"
        ) from None
    return merged


def check_signal_delay(config) -> None:
    """SIGUSR2 (checkpoint + requeue) must come after the job starts: signal_delay_s below the
    time limit."""
    if config.signal_delay_s >= config.timeout_min * 60:
        raise UserError(
            f"config key 'signal_delay_s' is {config.signal_delay_s}; it must be below the time "
            f"limit "
            f"(timeout_min={config.timeout_min}: {config.timeout_min * 60} s), or the "
            f"job is signalled to "
            "requeue as soon as it starts"
        )


def load_executor_config(path: str, overrides: list[str]):
    """The executor config of a file with key=value overrides; the defaults and every profile are
    checked."""
    config = load_config(ExecutorConfig, path, overrides)
    check_signal_delay(config)
    for step in config.profiles or {}:
        for_step(config, step)
    return config


def step_config(path: str, overrides: list[str], step: str):
    """The config of one job of `step` from the command line: the file's defaults, the step's
    profile over them, then the command line's overrides over both (`slurm submit pretrain ...
    executor.nodes=2` gets 2 nodes
    whatever the pretrain profile says)."""
    config = for_step(load_executor_config(path, overrides), step)
    for override in overrides:  # checked when the file loaded
        config = OmegaConf.merge(config, OmegaConf.from_dotlist([override]))
    check_config(config, ExecutorConfig)
    check_signal_delay(config)
    return config


MAX_JOB_NAME = 1024  # sbatch refuses a longer --job-name (Slurm 22.05)


def job_name(config, label: str = "") -> str:
    """The job's name in squeue / sacct: the executor's name, then what the job runs (a step, a
    graph node or a
    group of them), e.g. ssl-hsic:pretrain, ssl-hsic:linear/pretrained,
    ssl-hsic:segmentation/random-resnet18/seed0."""
    name = f"{config.name}:{label}" if label else str(config.name)
    return name[:MAX_JOB_NAME]


def slurm_parameters(config: ExecutorConfig, after: Sequence[str] = ()) -> dict:
    """submitit's slurm_* parameters for this config; `after`: the job ids it waits for
    (afterok)."""
    additional = dict(config.additional)
    if after:
        additional["dependency"] = "afterok:" + ":".join(after)
    params = dict(
        slurm_partition=config.partition,
        nodes=config.nodes,
        gpus_per_node=config.gpus_per_node or None,
        tasks_per_node=config.tasks_per_node,
        cpus_per_task=config.cpus_per_task,
        slurm_account=config.account,
        slurm_qos=config.qos,
        slurm_constraint=config.constraint,
        slurm_signal_delay_s=config.signal_delay_s,
        slurm_array_parallelism=config.array_parallelism,
        slurm_additional_parameters=additional or None,
        slurm_setup=list(config.setup) or None,
    )
    if config.mem_gb:
        params["mem_gb"] = config.mem_gb
    return {k: v for k, v in params.items() if v is not None}


def build_executor(
    config: ExecutorConfig,
    folder: str | Path | None = None,
    name: str | None = None,
    after: Sequence[str] = (),
):
    """The submitit executor of one job, or of one job array (several submissions in
    `executor.batch()`): named `name` (default: the config's name), waiting on SLURM for the jobs
    `after` to succeed. Submissions and
    dry runs (`sbatch_script`) both build it here, so a dry run prints what is submitted."""

    import submitit

    # submitit's own check, as one line
    if config.cluster == "slurm" and shutil.which("srun") is None:
        raise UserError(
            "cluster: slurm needs SLURM's commands (srun, sbatch) on PATH; run this on a SLURM "
            "login "
            "node, or set cluster: local"
        )
    extra = {"slurm_max_num_timeout": config.max_num_timeout} if config.cluster == "slurm" else {}
    executor = submitit.AutoExecutor(
        folder=str(folder or config.folder), cluster=config.cluster, **extra
    )
    executor.update_parameters(name=name or config.name, timeout_min=config.timeout_min)
    if config.cluster == "slurm":
        executor.update_parameters(**slurm_parameters(config, after))
    return executor


def local_slots(config: ExecutorConfig, cores: int | None = None) -> int:
    """How many local jobs run at once: parallel_jobs, or with 0 as many as the cores hold at
    threads_per_job
    threads each (one job when threads_per_job is unset: torch then takes every core)."""
    if config.parallel_jobs:
        return config.parallel_jobs
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // config.threads_per_job) if config.threads_per_job else 1


@contextmanager
def local_threads(config: ExecutorConfig):
    """Local jobs submitted inside start with OMP_NUM_THREADS=threads_per_job: submitit's local
    controller copies
    this process's environment when it starts a job. On SLURM nothing changes (threads follow
    cpus_per_task)."""
    if config.cluster != "local" or config.threads_per_job is None:
        yield
        return
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(config.threads_per_job)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous


def sbatch_script(
    config: ExecutorConfig,
    command: list[str],
    count: int = 1,
    folder: str | Path | None = None,
    name: str | None = None,
    after: Sequence[str] = (),
) -> str:
    """The sbatch script submitit writes for a job running `python -m COMMAND`
    (slurm.steps.Job.command), or for a job array of `count` tasks (submitit adds --array=0-<count -
    1>%<parallelism> when one batch holds several
    jobs): what a dry run shows."""
    from submitit.slurm.slurm import _make_sbatch_string

    slurm = build_executor(config, folder, name, after)._executor
    parameters = dict(slurm.parameters, **({"map_count": count} if count > 1 else {}))
    text = _make_sbatch_string(
        command=slurm._submitit_command_str, folder=slurm.folder, **parameters
    )
    return text + f"\n# inside that job, submitit runs: python -m {shlex.join(command)}\n"


def sbatch_flags(
    config: ExecutorConfig,
    count: int = 1,
    folder: str | Path | None = None,
    name: str | None = None,
    after: Sequence[str] = (),
) -> list[str]:
    """The flags of `sbatch_script`'s #SBATCH lines, unquoted: what sbatch reads, e.g.
    --time=1440."""
    script = sbatch_script(config, [], count, folder, name, after)
    return [shlex.split(line)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def show_flags(flags: list[str]) -> str:
    """The flags on one line as a person reads them: quoted only where a value has a space."""
    return " ".join(
        flag if not any(c.isspace() for c in flag) else shlex.quote(flag) for flag in flags
    )


def report_failure(job) -> str:
    """The job's log path and the last lines of its stderr."""
    stderr = Path(job.paths.stderr)
    tail = (
        stderr.read_text(errors="replace").strip().splitlines()[-3:]
        if stderr.exists()
        else ["(no stderr yet)"]
    )
    return f"job {job.job_id} failed; log {stderr}\n" + "\n".join("    " + line for line in tail)
