"""Dispatching a graph of jobs (slurm.graph.Node): the dry run that prints it, the submission to
SLURM (slurm.graph), or the local run that starts each job here as soon as the jobs it needs are
done. The pipeline, evaluations and sweeps all run through here.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from common.errors import UserError
from slurm import graph
from slurm.executor import (
    build_executor,
    for_step,
    job_name,
    local_slots,
    local_threads,
    report_failure,
    sbatch_flags,
    show_flags,
)
from slurm.graph import plan
from slurm.jobs import StepJob
from transfer.report import build_report


def shares_features(node) -> tuple | None:
    """Task jobs on the same backbone and config file compute the same frozen features (the first
    one caches them,
    transfer's feature cache): run at once, both would compute them."""
    job = node.job
    return (
        (job.options.get("backbone"), job.config)
        if job.options.get("backbone") and job.config
        else None
    )


def next_ready(waiting: list, finished: set, running: list):
    """The first waiting node whose needs are finished, preferring one that shares no features with
    a running job
    (it can read them from the cache once that one is done); None when none is ready."""
    ready = [node for node in waiting if all(need in finished for need in node.needs)]
    busy = {shares_features(node) for node in running} - {None}
    return next(
        (node for node in ready if shares_features(node) not in busy), ready[0] if ready else None
    )


def run_local(nodes, executor_config, label: str, root: Path, slots: int) -> dict:
    """Run the graph's jobs here as local submitit jobs, each as soon as the jobs it needs are done,
    up to `slots` at a time, taking ready jobs in the plan's order (so that pretraining starts
    first; `next_ready`). Steps done before are skipped. Each job's id goes into ROOT/manifest.json
    as it starts (`python -m slurm status ROOT` reads it). When a job fails, no new job starts; the
    running ones finish, then the first failure is raised. Returns each job's
    start and end in seconds from the start, and the jobs it waited for."""
    started, times = time.time(), {}
    finished = {node.name for node in nodes if node.is_done}
    for node in nodes:
        if node.name in finished:
            print(f"[{label}] {node.name}: done before, skipped")
    waiting = [node for node in nodes if node.name not in finished]
    running, failures = {}, []
    while waiting or running:
        while not failures and len(running) < slots:
            node = next_ready(waiting, finished, [n for n in nodes if n.name in running])
            if node is None:
                break
            # the step's own profile (its time limit) here too
            config = for_step(executor_config, node.step)
            folder = Path(config.folder)
            with local_threads(config):
                job = build_executor(config, folder, name=job_name(config, node.name)).submit(
                    StepJob(node.job, config.signal_delay_s)
                )
            node.job_id, node.folder = str(job.job_id), str(folder)
            graph.save(root, nodes)
            running[node.name] = job
            times[node.name] = {
                "start_s": round(time.time() - started, 1),
                "needs": list(node.needs),
            }
            waiting.remove(node)
            print(f"[{label}] {node.name}: job {job.job_id} ({config.cluster})", flush=True)
        if not running:  # nothing can start: what is left waits on a failed job
            break
        time.sleep(0.5)
        for name, job in list(running.items()):
            try:
                if not job.done():
                    continue
                failed = False
                job.result()
            except Exception:  # (the debug executor runs the job inside done(), and raises there)
                failed = True
            del running[name]
            times[name]["end_s"] = round(time.time() - started, 1)
            if failed:
                failures.append(
                    f"{label} step {name} failed: " + report_failure(job).replace("\n", " |")
                )
                print(
                    f"[{label}] {failures[-1]}"
                    + (f"; waiting for the running {', '.join(running)}" if running else ""),
                    flush=True,
                )
                continue
            finished.add(name)
            print(
                f"[{label}] {name}: finished in "
                f"{times[name]['end_s'] - times[name]['start_s']:.0f} s",
                flush=True,
            )
    if failures:
        raise UserError(failures[0])
    if waiting:  # the plan names a job that no job provides: a bug, not the user's input
        raise RuntimeError(
            f"{label}: {', '.join(n.name for n in waiting)} wait on jobs that are not in the graph"
        )
    return times


def describe_graph(nodes, executor_config, root: Path, label: str) -> None:
    """The dry run: what a run would do, job by job. On SLURM, each job or job array's sbatch flags
    as slurm.graph.submit sends them (the same plan and the same executor), with the jobs it waits
    for as {name} where their ids will be (--dependency=afterok:{pretrain}:{verify}), then each
    task's command line;
    locally, each step's command in the order they run."""
    if executor_config.cluster == "slurm":
        batches, current = plan(nodes, executor_config, root)
        submitted = {node.name for batch in batches for node in batch.nodes}
        for node in nodes:
            if node.name not in submitted:
                state, _ = current[node.name]
                print(
                    f"[{label}] {node.name}: {state}"
                    + (f" (job {node.job_id})" if state != "DONE" else "")
                    + ", not submitted again"
                )
        for batch in batches:
            flags = sbatch_flags(
                batch.config,
                len(batch.nodes),
                batch.folder,
                batch.name,
                ["{" + ref + "}" for ref in batch.after],
            )
            print(f"[{label}] {batch.key}: sbatch {show_flags(flags)}")
            for index, node in enumerate(batch.nodes):
                task = f" (array task {index})" if len(batch.nodes) > 1 else ""
                print(f"[{label}] {node.name}{task}: python -m {shlex.join(node.job.command())}")
        return
    for node in nodes:
        if node.is_done:
            print(f"[{label}] {node.name}: done before, skipped")
            continue
        print(f"[{label}] {node.name}: after {', '.join(node.needs) or 'nothing'}")
        print(f"[{label}] {node.name}: python -m {shlex.join(node.job.command())}")


def run_graph(
    nodes,
    executor_config,
    root: Path,
    dry_run: bool,
    label: str,
    report_dirs: list[str],
    baseline: str | None = None,
    pooled: list[str] = (),
) -> dict:
    """Print the graph (dry run), submit it to SLURM as one dependency graph and return, or run its
    steps here
    (`run_local`; the last node is the report, built in this process) and return the report."""
    if dry_run:
        describe_graph(nodes, executor_config, root, label)
        return {}
    if executor_config.cluster == "slurm":
        graph.submit(nodes, executor_config, root)
        print(
            f"[{label}] submitted to SLURM as one dependency graph; manifest "
            f"{root / graph.MANIFEST}\n"
            f"[{label}] follow it with: python -m slurm status {root}"
        )
        return {}
    started, slots = time.time(), local_slots(executor_config)
    times = run_local(nodes[:-1], executor_config, label, root, slots)
    report = build_report(report_dirs, root / "report", baseline=baseline, pooled=pooled)
    total = time.time() - started
    timing = {
        "total_s": round(total, 1),
        "parallel_jobs": slots,
        "threads_per_job": executor_config.threads_per_job,
        "jobs": times,
    }
    (root / "report" / "timings.json").write_text(json.dumps(timing, indent=2))
    print(f"[{label}] done in {total / 60:.1f} min; report: {root / 'report' / 'report.md'}")
    return report
