"""Executor config (configs/slurm/*.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ExecutorConfig:
    cluster: str = "local"                  # local: subprocesses here | slurm: sbatch | debug: in this process
    folder: str = "runs/jobs"               # submitit's job files and logs (%j = job id)
    name: str = "ssl-hsic"
    timeout_min: int = 60
    # SLURM only
    partition: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1                 # one task per GPU for distributed training
    cpus_per_task: int = 1
    mem_gb: Optional[float] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    signal_delay_s: int = 90                # SIGUSR2 this long before the time limit: checkpoint + requeue
    max_num_timeout: int = 3                # requeues after timeouts (preemptions do not count)
    array_parallelism: int = 64
    additional: dict = field(default_factory=dict)   # extra sbatch flags, e.g. {exclude: node12}
    setup: list = field(default_factory=list)        # shell lines before the job (module load ...)
