"""A dependency graph of step jobs, submitted to SLURM at once, and its state.

Each node is a step (pretrain, export, a task run, the report...) with the file that marks it done and the nodes
it needs. `submit` sends every node that is not done as an sbatch job with `--dependency=afterok:<ids of what it
needs>`, the nodes of one group (a task on one backbone over seeds) as one job array, and writes the manifest
ROOT/pipeline.json; nothing stays running on the login node. SLURM starts each job when its inputs exist; a job
whose input failed stays pending for ever (reason DependencyNeverSatisfied).

`states` reads the manifest, the done markers, submitit's result files and `squeue`: DONE, FAILED (with its
log), PENDING / RUNNING / ..., or NEVER (naming the failed step it waits for). A rerun of `submit` skips what is
done, keeps what is pending or running on live inputs, and resubmits the rest (failed, lost, or pending on a
failed input, which it cancels first).
"""
from __future__ import annotations

import json
import pickle
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pretrain.errors import UserError
from pretrain.io import atomic_write_bytes

MANIFEST = "pipeline.json"
FINISHED_BAD = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
                "LOST")
LIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


@dataclass
class Node:
    name: str                 # unique, e.g. "linear/pretrained/seed0"
    step: str                 # what the job runs (slurm.jobs.steps())
    argv: list[str]
    done: str                 # the file whose existence means the step is done
    needs: list[str] = field(default_factory=list)
    group: str = ""           # nodes of one group go into one job array (same step, same needs)
    job_id: str = ""
    folder: str = ""

    @property
    def is_done(self) -> bool:
        return Path(self.done).exists()


def squeue_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason) for the jobs the controller still knows (recent ones included)."""
    if not job_ids:
        return {}
    bases = sorted({job_id.split("_")[0] for job_id in job_ids})
    out = subprocess.run(["squeue", "-h", "-t", "all", "-r", "-o", "%i|%T|%r", "-j", ",".join(bases)],
                         capture_output=True, text=True).stdout
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
                result[node.name] = ("NEVER", f"needs {culprit}, which ended {result[culprit][0]} "
                                               f"({result[culprit][1]})")
    return result


def load(root: str | Path) -> list[Node]:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise UserError(f"{path} does not exist: pass the root of a pipeline submitted to SLURM")
    return [Node(**entry) for entry in json.loads(path.read_text())["jobs"]]


def _save(root: Path, nodes: list[Node]) -> None:
    atomic_write_bytes(root / MANIFEST, json.dumps({"jobs": [asdict(n) for n in nodes]}, indent=2).encode())


def check_partitions(configs) -> None:
    """Every partition the jobs ask for exists on this cluster (before anything is submitted)."""
    for partition in sorted({c.partition for c in configs if c.partition}):
        found = subprocess.run(["scontrol", "show", "partition", partition], capture_output=True, text=True)
        if found.returncode != 0:
            raise UserError(f"SLURM partition '{partition}' does not exist on this cluster (sinfo lists the "
                            "partitions); set executor.partition or the step's profile")


def submit(nodes: list[Node], executor_config, root: str | Path, signal_delay_s: float | None = None) -> list[Node]:
    """Submit what is not done (see the module docstring); write and return the manifest's nodes."""
    from slurm.executor import build_executor, for_step
    from slurm.jobs import StepJob
    root = Path(root)
    previous = {n.name: n for n in load(root)} if (root / MANIFEST).exists() else {}
    for node in nodes:
        if node.name in previous:
            node.job_id, node.folder = previous[node.name].job_id, previous[node.name].folder
    current = states(nodes)
    configs = {node.step: for_step(executor_config, node.step) for node in nodes}
    check_partitions(configs.values())
    by_name = {n.name: n for n in nodes}
    resubmitted: set[str] = set()
    groups: dict[str, list[Node]] = {}  # in the plan's order: what a node needs comes before it
    for node in nodes:
        groups.setdefault(node.group or node.name, []).append(node)
    for group in groups.values():
        todo = []
        for node in group:
            state, _ = current[node.name]
            keep = state == "DONE" or (state in LIVE and not (set(node.needs) & resubmitted))
            if not keep:
                if node.job_id and (state in LIVE or state == "NEVER"):  # still queued: replace it
                    subprocess.run(["scancel", node.job_id], capture_output=True)
                todo.append(node)
        if not todo:
            continue
        needs = sorted({need for node in todo for need in node.needs})
        waits = [by_name[n].job_id for n in needs if current[n][0] != "DONE" or n in resubmitted]
        config = configs[todo[0].step]
        folder = root / "jobs" / todo[0].step
        executor = build_executor(config, folder=folder)
        if waits:
            executor.update_parameters(slurm_additional_parameters={**dict(config.additional),
                                                                    "dependency": "afterok:" + ":".join(waits)})
        delay = signal_delay_s if signal_delay_s is not None else config.signal_delay_s
        with executor.batch():
            handles = [executor.submit(StepJob(node.step, node.argv, delay)) for node in todo]
        for node, handle in zip(todo, handles):
            node.job_id, node.folder = str(handle.job_id), str(folder)
            resubmitted.add(node.name)
            current[node.name] = ("PENDING", "")
    _save(root, nodes)
    return nodes
