"""torch.distributed from the environment: torchrun's variables, or SLURM's (one task per GPU), or
nothing
(a single process). The same training code runs in all three."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.errors import UserError


@dataclass(frozen=True)
class DistributedEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ('gpu[003-005,010],cpu1' -> 'gpu003'), via scontrol
    when present."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, ranges = head.split("[", 1)
        return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]
    return head


def detect(environ: dict[str, str] | None = None) -> DistributedEnv:
    """Read rank, world size, local rank and the rendezvous address from the environment."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or a launcher that set them
        return DistributedEnv(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return DistributedEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))),
            int(env.get("MASTER_PORT", 20000 + job_id % 20000)),
        )
    return DistributedEnv()


def init_distributed(backend: str | None = None) -> DistributedEnv:
    """Initialise the default process group when the environment describes several processes."""
    info = detect()
    if not info.is_distributed or dist.is_initialized():
        return info
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(
        backend,
        init_method=f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
    )
    return info


def match_threads_to_allocation(environ: dict[str, str] | None = None) -> int | None:
    """Use as many intra-op threads as the CPUs SLURM gave this task (SLURM_CPUS_PER_TASK), unless
    OMP_NUM_THREADS says otherwise; return the number set, or None when nothing was changed.

    torch starts one thread per core of the machine. In a job that holds fewer cores than the node
    has, those threads share the allocation with other jobs' work and wait on each other at every
    parallel region: on a 2-core machine with one core busy, a step took 35x longer (BENCHMARKS.md).
    """
    env = os.environ if environ is None else environ
    cpus = env.get("SLURM_CPUS_PER_TASK")
    if not cpus or "OMP_NUM_THREADS" in env:
        return None
    threads = max(1, int(cpus))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def shutdown_distributed() -> None:
    """Leave the process group together: a barrier, then destroy it.

    Without the barrier a rank that tears its gloo connections down first can abort a peer still
    inside the last collective ("terminate called without an active exception", SIGABRT)."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (nothing under one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank0_decides(flag: bool) -> bool:
    """Rank 0's value of `flag` on every rank (the ranks must take the same branch before a
    collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)])
    dist.broadcast(value, 0)
    return bool(value.item())


def check_global_batch(key: str, batch: int, processes: int, among: str | None = None) -> None:
    """UserError unless the global batch `key`=`batch` divides among `processes` (described by
    `among`)."""
    if batch % processes:
        raise UserError(
            f"{key}={batch} (the global batch) does not divide among "
            f"{among or f'the {processes} processes'}"
            f"; choose a multiple of {processes}"
        )
