"""A submitit executor from an ExecutorConfig, and the sbatch script it would submit (dry run)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from pretrain.errors import UserError
from slurm.schema import ExecutorConfig

CLUSTERS = ("local", "slurm", "debug")


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
    if config.cluster not in CLUSTERS:
        raise UserError(f"unknown cluster '{config.cluster}'; choose one of {', '.join(CLUSTERS)} (cluster=...)")
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
