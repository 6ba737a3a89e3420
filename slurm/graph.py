"""A dependency graph of step jobs (a pipeline, an evaluation, a sweep), submitted to SLURM at once,
and its state.

Each node is a job (slurm.steps.Job: pretrain, export, a task run, the report...) with the file that
marks it done and the nodes it needs. `plan` decides what a submission sends and `submit` sends it:
every node that is not done as an sbatch
job with `--dependency=afterok:<ids of what it needs>` (a job array's id when it needs all of that array), the nodes
of one group (a task on one backbone over seeds) as one job array, each named after what it runs
(ssl-hsic:linear/pretrained), and writes the manifest ROOT/manifest.json; nothing stays running on
the login node. Local runs (slurm.pipeline.run_local) write the same manifest, so one `status` reads
every kind of run. A dry run prints the same plan, with {name} where the ids will be. SLURM starts
each job when its inputs exist; a job whose input failed stays pending for ever (reason
DependencyNeverSatisfied).

`states` reads the manifest, the done markers, submitit's result files and `squeue`: DONE, FAILED
(with its log), PENDING / RUNNING / ..., or NEVER (naming the failed step it waits for). A rerun of
`submit` skips what is done, keeps what is pending or running on live inputs, and resubmits the rest
(failed, lost, or pending on a failed input, which it cancels first)."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.files import atomic_write_bytes
from slurm.executor import build_executor, for_step, job_name
from slurm.jobs import StepJob
from slurm.steps import Job

MANIFEST = "manifest.json"
FINISHED_BAD = (
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "LOST",
)
LIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


@dataclass
class Node:
    name: str  # unique, e.g. "linear/pretrained/seed0"
    job: Job  # what it runs
    done: str  # the file whose existence means the step is done
    needs: list[str] = field(default_factory=list)
    group: str = ""  # nodes of one group go into one job array (same step, same needs)
    job_id: str = ""
    folder: str = ""

    @property
    def step(self) -> str:
        return self.job.step

    @property
    def is_done(self) -> bool:
        return Path(self.done).exists()

    @classmethod
    def from_record(cls, entry: dict) -> "Node":
        return cls(**{**entry, "job": Job(**entry["job"])})


def squeue_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason) for the jobs the controller still knows (recent ones included)."""
    if not job_ids or shutil.which("squeue") is None:  # local jobs, on a machine without SLURM
        return {}
    bases = sorted({job_id.split("_")[0] for job_id in job_ids})
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-r", "-o", "%i|%T|%r", "-j", ",".join(bases)],
        capture_output=True,
        text=True,
    ).stdout
    states = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], parts[2])
    return states


def _result(node: Node) -> str | None:
    """'success' / 'error' from submitit's result file of the node's job, or None."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(node.folder, job_id=node.job_id)
    if not paths.result_pickle.exists():
        return None
    with open(paths.result_pickle, "rb") as f:
        return pickle.load(f)[0]


def log_path(node: Node) -> str:
    from submitit.core.utils import JobPaths

    return str(JobPaths(node.folder, job_id=node.job_id).stderr)


def states(nodes: list[Node]) -> dict[str, tuple[str, str]]:
    """name -> (state, detail) for every node; NEVER where a needed node failed (transitively)."""
    queue = squeue_states([n.job_id for n in nodes if n.job_id and not n.is_done])
    result: dict[str, tuple[str, str]] = {}
    by_name = {n.name: n for n in nodes}
    for node in nodes:
        if node.is_done:
            result[node.name] = ("DONE", node.done)
        elif not node.job_id:
            result[node.name] = ("NOT SUBMITTED", "")
        elif _result(node) == "error":
            result[node.name] = ("FAILED", f"log {log_path(node)}")
        elif node.job_id in queue:
            state, reason = queue[node.job_id]
            if state == "COMPLETED":  # finished but left no marker: it did not do its job
                state, reason = "FAILED", f"completed without writing {node.done}"
            result[node.name] = (state, reason if state in LIVE else f"log {log_path(node)}")
        else:
            result[node.name] = ("LOST", f"not in the queue and no result; log {log_path(node)}")

    def failed_input(name: str, seen: frozenset = frozenset()) -> str | None:
        for need in by_name[name].needs:
            if need in seen:
                continue
            state, _ = result[need]
            if state in FINISHED_BAD:
                return need
            upstream = failed_input(need, seen | {name})
            if upstream:
                return upstream
        return None

    for node in nodes:
        state, _ = result[node.name]
        if state in LIVE or state == "NOT SUBMITTED":
            culprit = failed_input(node.name)
            if culprit:
                result[node.name] = (
                    "NEVER",
                    f"needs {culprit}, which ended {result[culprit][0]} ({result[culprit][1]})",
                )
    return result


def load(root: str | Path) -> list[Node]:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise UserError(f"{path} does not exist: pass the root of a pipeline submitted to SLURM")
    try:
        return [Node.from_record(entry) for entry in json.loads(path.read_text())["jobs"]]
    except (ValueError, KeyError, TypeError, UserError) as error:
        raise UserError(
            f"{path} is not a job manifest ({type(error).__name__}: {error}); resubmit the "
            "pipeline to write it again"
        ) from None


def save(root: Path, nodes: list[Node]) -> None:
    atomic_write_bytes(
        root / MANIFEST, json.dumps({"jobs": [asdict(n) for n in nodes]}, indent=2).encode()
    )


def check_partitions(configs) -> None:
    """Every partition the jobs ask for exists on this cluster (before anything is submitted)."""
    for partition in sorted({c.partition for c in configs if c.partition}):
        found = subprocess.run(
            ["scontrol", "show", "partition", partition], capture_output=True, text=True
        )
        if found.returncode != 0:
            raise UserError(
                f"SLURM partition '{partition}' does not exist on this cluster (sinfo lists the "
                "partitions); set executor.partition or the step's profile"
            )


@dataclass
class Batch:
    """One sbatch call of a submission: a job, or a job array over the nodes of one group."""

    # the group (a job array), or the node's name (one job): the job is named after it
    key: str
    nodes: list[Node]
    config: Any  # the step's executor config (slurm.executor.for_step)
    folder: Path
    # keys of batches before it, or names of queued nodes
    after: list[str] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)  # queued jobs of these nodes that it replaces

    @property
    def name(self) -> str:
        return job_name(self.config, self.key)


def plan(
    nodes: list[Node], executor_config, root: str | Path
) -> tuple[list[Batch], dict[str, tuple[str, str]]]:
    """What `submit` sends, in order, and every node's state before it: the nodes that are neither
    done nor kept (pending or running on live inputs) as one job, or one job array per group, each
    waiting for the batches and queued nodes it needs. Reads the manifest and the queue of a
    previous submission; submits nothing, so a dry
    run prints the same plan."""
    root = Path(root)
    previous = {n.name: n for n in load(root)} if (root / MANIFEST).exists() else {}
    for node in nodes:
        if node.name in previous:
            node.job_id, node.folder = previous[node.name].job_id, previous[node.name].folder
    current = states(nodes)
    configs = {node.step: for_step(executor_config, node.step) for node in nodes}
    groups: dict[str, list[Node]] = {}  # in the plan's order: what a node needs comes before it
    for node in nodes:
        groups.setdefault(node.group or node.name, []).append(node)
    batches: list[Batch] = []
    batch_of: dict[str, Batch] = {}  # node name -> the batch that submits it now
    for key, group in groups.items():
        todo, cancel = [], []
        for node in group:
            state, _ = current[node.name]
            keep = state == "DONE" or (state in LIVE and not (set(node.needs) & set(batch_of)))
            if not keep:
                if node.job_id and (state in LIVE or state == "NEVER"):  # still queued: replace it
                    cancel.append(node.job_id)
                todo.append(node)
        if not todo:
            continue
        waits = {
            need
            for node in todo
            for need in node.needs
            if current[need][0] != "DONE" or need in batch_of
        }
        after = []
        # a batch of this submission whose nodes are all needed: its (array) job id
        for other in batches:
            names = {n.name for n in other.nodes}
            if names <= waits:
                after.append(other.key)
                waits -= names
        # single nodes: queued before, or in a batch
        after += [node.name for node in nodes if node.name in waits]
        batch = Batch(
            key if len(todo) > 1 else todo[0].name,
            todo,
            configs[todo[0].step],
            root / "jobs" / todo[0].step,
            after,
            cancel,
        )
        batches.append(batch)
        batch_of.update((node.name, batch) for node in todo)
    return batches, current


def submit(
    nodes: list[Node], executor_config, root: str | Path, signal_delay_s: float | None = None
) -> list[Node]:
    """Submit what is not done (see the module docstring and `plan`); write and return the
    manifest's nodes."""
    root = Path(root)
    batches, _ = plan(nodes, executor_config, root)
    check_partitions([batch.config for batch in batches])
    ids = {node.name: node.job_id for node in nodes if node.job_id}  # what `after` names -> job ids
    for batch in batches:
        for job_id in batch.cancel:
            subprocess.run(["scancel", job_id], capture_output=True)
        executor = build_executor(
            batch.config,
            folder=batch.folder,
            name=batch.name,
            after=[ids[ref] for ref in batch.after],
        )
        delay = signal_delay_s if signal_delay_s is not None else batch.config.signal_delay_s
        with executor.batch():
            handles = [executor.submit(StepJob(node.job, delay)) for node in batch.nodes]
        for node, handle in zip(batch.nodes, handles):
            node.job_id, node.folder = str(handle.job_id), str(batch.folder)
            ids[node.name] = node.job_id
        # a job array's id: afterok on it waits for all its tasks
        ids[batch.key] = node.job_id.split("_")[0]
    save(root, nodes)
    return nodes


def wait(
    nodes: list[Node], poll_s: float = 2.0, timeout_s: float = 24 * 3600
) -> dict[str, tuple[str, str]]:
    """Poll `states` until no node is pending or running (or `timeout_s` passes); the last
    states."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = states(nodes)
        if all(state not in LIVE for state, _ in current.values()) or time.monotonic() > deadline:
            return current
        time.sleep(poll_s)
