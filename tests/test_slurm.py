"""SLURM dispatch on the real one-node cluster: requeue on timeout, failures, sweeps, distributed
init; dry runs."""

import contextlib
import io
import json
import re
import runpy
import shlex
import sys
import time

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from common.distributed import detect, first_host, init_distributed, shutdown_distributed
from slurm.executor import ExecutorConfig, build_executor, local_slots
from slurm.jobs import StepJob
from slurm.steps import Job
from tests.helpers import TINY, assert_same_weights, final_state, run_cli

pytestmark = pytest.mark.slow


def cluster_executor(tmp_path, **overrides):

    return OmegaConf.structured(
        ExecutorConfig(cluster="slurm", folder=str(tmp_path / "jobs"), **overrides)
    )


def release_requeued(cluster, job_id, timelimit_min):
    """A requeued job waits ~2 minutes (Reason=BeginTime): release it now, with a longer time limit
    so that
    one interruption is what the test sees. True if it was waiting."""
    info = cluster.scontrol("show", "job", str(job_id), check=False).stdout
    if "JobState=PENDING" in info and "Reason=BeginTime" in info:
        cluster.scontrol("update", f"jobid={job_id}", f"timelimit={timelimit_min}")
        cluster.scontrol("update", f"jobid={job_id}", "starttime=now")
        return True
    return False


@pytest.mark.timeout(2400)
def test_timed_out_pretraining_requeues_and_ends_like_an_uninterrupted_run(
    slurm_cluster, tmp_path, cpu_burner
):
    """With a process burning one of the two cores all along, as on a busy machine. The
    uninterrupted twin runs at the same time as a second job (the node's other CPU): both jobs hold
    one CPU, so one torch thread each,
    and bitwise equality needs the same reduction order."""

    # About 300 steps: longer than the 1-minute limit, whose SIGUSR2 comes 40 s before it.
    overrides = [*TINY, "data.image_size=32", "optim.epochs=100", "train.checkpoint_every=1000"]

    def args(run_dir):
        return Job(
            "pretrain", "configs/pretrain/fashion_mnist_resnet18.yaml", overrides, str(run_dir)
        )

    executor = build_executor(
        cluster_executor(tmp_path, timeout_min=1, signal_delay_s=40, max_num_timeout=5)
    )
    job = executor.submit(StepJob(args(tmp_path / "job"), signal_delay_s=40))
    twin_executor = build_executor(
        cluster_executor(tmp_path / "twin", timeout_min=15, max_num_timeout=0)
    )
    twin = twin_executor.submit(StepJob(args(tmp_path / "straight"), signal_delay_s=40))
    requeued = False
    deadline = time.monotonic() + 1500
    while not (job.done() and twin.done()) and time.monotonic() < deadline:
        requeued |= release_requeued(slurm_cluster, job.job_id, timelimit_min=15)
        time.sleep(1)
    for each in (job, twin):
        assert each.done(), (
            f"job {each.job_id} did not finish: "
            f"{slurm_cluster.scontrol('show', 'job', each.job_id).stdout}"
        )
    result = job.result()
    assert requeued, "the job was never requeued"
    log = (tmp_path / "job" / "log.txt").read_text()
    job_log = "".join(p.read_text() for p in sorted((tmp_path / "jobs").glob("*_log.*")))
    assert (
        "Caught signal SIGUSR2" in job_log and "timed-out" in job_log and "Requeued job" in job_log
    )
    assert "resuming" in log
    assert cpu_burner.poll() is None  # the load lasted the whole job
    cpu_burner.kill()
    latency = float(log.split("stop signal -> checkpoint written in ")[1].split(" s")[0])
    assert 0 <= latency < 40 and "(budget 40 s)" in log
    interrupted_at = int(log.split("resuming")[1].split("at step ")[1].split()[0])
    assert 0 < interrupted_at < 300
    assert result["metrics"]["loss"] < 0
    assert "resuming" not in (tmp_path / "straight" / "log.txt").read_text()
    assert twin.result()["metrics"]["loss"] == result["metrics"]["loss"]
    assert_same_weights(final_state(tmp_path / "job"), final_state(tmp_path / "straight"))


def test_failed_job_is_reported_with_its_log_tail(slurm_cluster, tmp_path):
    executor = tmp_path / "executor.yaml"
    executor.write_text(f"cluster: slurm\nfolder: {tmp_path / 'jobs'}\ntimeout_min: 5\n")
    result = run_cli(
        "slurm",
        "submit",
        "linear",
        "--backbone",
        str(tmp_path / "missing.pth"),
        "--config",
        "configs/transfer/linear_fashion_mnist.yaml",
        f"run_dir={tmp_path / 'run'}",
        "--executor",
        str(executor),
        "--wait",
        timeout=300,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    # (sacct's complaints come before: no accounting here)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: job ") and " failed; log " in last and "_log.err" in last
    # the job's stderr
    assert f"linear failed: checkpoint {tmp_path / 'missing.pth'} does not exist" in last
    job_id = last.split("error: job ")[1].split()[0]
    # squeue / sacct show the step
    assert job_name_in_slurm(slurm_cluster, job_id) == "ssl-hsic:linear"


def job_name_in_slurm(cluster, job_id: str) -> str:
    return re.search(r"JobName=(\S+)", cluster.scontrol("show", "job", job_id).stdout)[1]


def test_sweep_2x2_runs_and_collect_gathers_4_results(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""
run_root: {tmp_path / "sweep"}
backbones: [random:resnet18, random:resnet34]
tasks: {{knn: configs/transfer/linear_fashion_mnist.yaml}}
seeds: [0, 1]
overrides: [[data.limit_train=300, data.limit_test=100, data.num_workers=0, cache_dir={tmp_path / "cache"}]]
""")
    executor = tmp_path / "executor.yaml"
    executor.write_text("cluster: slurm\ntimeout_min: 10\n")
    result = run_cli(
        "slurm", "sweep", "--config", str(sweep), "--executor", str(executor), "--wait", timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "submitted 4 jobs (slurm)" in result.stdout and result.stdout.count("DONE") == 4
    # one job array per task and backbone over the seeds, named after them
    manifest = json.loads((tmp_path / "sweep" / "manifest.json").read_text())["jobs"]
    arrays = {}
    for job in manifest:
        arrays.setdefault(job["job_id"].split("_")[0], []).append(job["job_id"].split("_")[1])
    assert sorted(arrays.values()) == [["0", "1"], ["0", "1"]]
    names = {job_name_in_slurm(slurm_cluster, array) for array in arrays}
    assert names == {"ssl-hsic:knn/random-resnet18", "ssl-hsic:knn/random-resnet34"}
    result = run_cli("slurm", "collect", str(tmp_path / "sweep"))
    assert result.returncode == 0, result.stderr
    import pandas as pd

    frame = pd.read_csv(tmp_path / "sweep" / "report" / "report.csv")
    # one row per run and metric
    assert set(frame.metric) == {"top1", "top5"} and len(frame) == 4 * 2
    # two random-init architectures are two backbones, each over its 2 seeds (they used to merge
    # into one column)
    assert frame.groupby("backbone").seed.nunique().to_dict() == {
        "random-resnet18": 2,
        "random-resnet34": 2,
    }
    runs = sorted((tmp_path / "sweep" / "knn").glob("*/seed*/metrics.json"))
    assert len(runs) == 4
    for path in runs:
        record = json.loads(path.read_text())
        row = frame[(frame.run_dir == str(path.parent)) & (frame.metric == "top1")]
        assert (
            row.value.item() == pytest.approx(record["metrics"]["top1"])
            and 0 <= row.value.item() <= 100
        )
    table = (tmp_path / "sweep" / "report" / "report.md").read_text()
    assert "| metric | random-resnet18 (baseline) | random-resnet34 |" in table


def _distributed_probe():

    info = init_distributed("gloo")
    total = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(total)
    result = {
        "rank": info.rank,
        "world": info.world_size,
        "local": info.local_rank,
        "master": info.master_addr,
        "sum": total.item(),
        "detected": detect().rank,
    }
    shutdown_distributed()
    return result


def test_distributed_init_reads_a_two_task_allocation(slurm_cluster, tmp_path):

    executor = build_executor(cluster_executor(tmp_path, tasks_per_node=2, timeout_min=5))
    job = executor.submit(_distributed_probe)
    results = job.results()  # one per task
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(
        r["world"] == 2 and r["sum"] == 3.0 and r["master"] == slurm_cluster.host for r in results
    )
    assert sorted(r["local"] for r in results) == [0, 1]


def test_first_host_of_a_node_list():

    assert first_host("gpu[003-005,010],cpu1") == "gpu003"
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[7-8]",
    }
    info = detect(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (
        3,
        8,
        1,
        "node7",
        20000 + 4242,
    )


def test_dry_run_prints_the_sbatch_script_without_submitting(tmp_path):
    result = run_cli(
        "slurm",
        "submit",
        "pretrain",
        "--config",
        "configs/pretrain/imagenet_resnet50.yaml",
        "--executor",
        "configs/slurm/cluster.yaml",
        "executor.nodes=4",
        "executor.partition=a100",
        f"executor.folder={tmp_path / 'jobs'}",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    # the pretrain profile (4 nodes, 24 h), the command line over it (executor.nodes,
    # executor.partition)
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --partition=a100",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --time=1440",
        "#SBATCH --job-name=ssl-hsic:pretrain",
    ):
        assert line in result.stdout
    assert "python -m pretrain --config configs/pretrain/imagenet_resnet50.yaml" in result.stdout
    result = run_cli(
        "slurm",
        "submit",
        "pretrain",
        "--executor",
        "configs/slurm/cluster.yaml",
        "executor.nodes=2",
        f"executor.folder={tmp_path / 'jobs'}",
        "--dry-run",
    )
    assert "#SBATCH --nodes=2" in result.stdout and "#SBATCH --time=1440" in result.stdout
    assert not (tmp_path / "jobs").exists()


def test_dry_runs_name_each_job_by_its_step_and_size_it_by_its_profile(tmp_path):
    executor = tmp_path / "executor.yaml"
    executor.write_text(
        json.dumps(
            {
                "cluster": "slurm",
                "timeout_min": 30,
                "profiles": {"segmentation": {"timeout_min": 90, "array_parallelism": 2}},
            }
        )
    )
    result = run_cli(
        "slurm",
        "evaluate",
        "--backbone",
        "random:resnet18",
        "--backbone",
        "random:resnet34",
        "--task",
        "segmentation=configs/transfer/segmentation_scenes.yaml",
        "--seeds",
        "0",
        "1",
        "2",
        "--root",
        str(tmp_path / "eval"),
        "--executor",
        str(executor),
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    array = next(
        line
        for line in lines
        if line.startswith("[evaluate] segmentation/random-resnet18: sbatch ")
    )
    assert " --array=0-2%2 " in array and " --time=90 " in array and "--dependency" not in array
    assert " --job-name=ssl-hsic:segmentation/random-resnet18 " in array
    report = next(line for line in lines if line.startswith("[evaluate] report: sbatch "))
    assert (
        " --dependency=afterok:{segmentation/random-resnet18}:{segmentation/random-resnet34} "
        in report
    )
    assert " --time=30 " in report and " --job-name=ssl-hsic:report " in report
    assert (
        "[evaluate] segmentation/random-resnet34/seed2 (array task 2): python -m transfer "
        "segmentation " in result.stdout
    )
    assert not (tmp_path / "eval").exists()

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        json.dumps(
            {
                "run_root": str(tmp_path / "sweep"),
                "backbones": ["random:resnet18"],
                "tasks": {"knn": "configs/transfer/linear_fashion_mnist.yaml"},
                "seeds": [4],
            }
        )
    )
    result = run_cli(
        "slurm", "sweep", "--config", str(sweep), "--executor", str(executor), "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    # one task, one backbone, one seed: a single job named after its run
    first = result.stdout.splitlines()[0]
    assert first.startswith("[sweep] knn/random-resnet18/seed4: sbatch ")
    assert " --job-name=ssl-hsic:knn/random-resnet18/seed4 " in first
    assert "--array" not in first and " --time=30 " in first
    assert not (tmp_path / "sweep").exists()


def printed_commands(stdout: str) -> list[list[str]]:
    return [
        shlex.split(line.split(": python -m ", 1)[1])
        for line in stdout.splitlines()
        if ": python -m " in line
    ]


def run_help(command: list[str]) -> str:
    """`python -m COMMAND --help` in this process (runpy runs a module as `python -m` does); its
    output."""
    module, rest = command[0], command[1:]
    out, argv = io.StringIO(), sys.argv
    sys.argv = [module, *rest, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    assert exit.value.code in (0, None), command
    return out.getvalue()


@pytest.mark.parametrize("cluster", ["local", "slurm"])
def test_every_command_a_dry_run_prints_runs(tmp_path, cluster):
    """Each command the pipeline's, an evaluation's and a sweep's dry runs print, run with --help
    appended: its module, subcommand and every argument it carries parse (one per step: the commands
    of a step differ only in
    values)."""
    executor = "configs/slurm/cluster.yaml" if cluster == "slurm" else "configs/slurm/local.yaml"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        json.dumps(
            {
                "run_root": str(tmp_path / "sweep"),
                "backbones": ["random:resnet18"],
                "tasks": {"knn": "configs/transfer/linear_fashion_mnist.yaml"},
                "seeds": [4],
            }
        )
    )
    runs = [
        (
            "pipeline",
            "--config",
            "configs/pipeline/demo.yaml",
            "--dry-run",
            f"root={tmp_path / 'demo'}",
            f"executor={executor}",
        ),
        (
            "evaluate",
            "--backbone",
            "random:resnet18",
            "--task",
            "depth=configs/transfer/depth_scenes.yaml",
            "--root",
            str(tmp_path / "eval"),
            "--executor",
            executor,
            "--dry-run",
        ),
        ("sweep", "--config", str(sweep), "--executor", executor, "--dry-run"),
    ]
    by_step = {}
    for argv in runs:
        result = run_cli("slurm", *argv)
        assert result.returncode == 0, result.stderr
        for command in printed_commands(result.stdout):
            by_step.setdefault(
                tuple(command[:2]) if command[0] == "transfer" else (command[0],), command
            )
    assert sorted(by_step) == [
        ("pretrain",),
        ("pretrain.supervised",),
        *(
            ("transfer", sub)
            for sub in sorted(
                (
                    "scenes",
                    "export",
                    "verify",
                    "linear",
                    "knn",
                    "finetune",
                    "segmentation",
                    "classify",
                    "detection",
                    "depth",
                    "report",
                )
            )
        ),
    ]
    for key, command in by_step.items():
        assert run_help(command).startswith(f"usage: python -m {' '.join(key)} "), command
    assert not any((tmp_path / name).exists() for name in ("demo", "eval", "sweep"))


def test_local_slots_fill_the_cores_at_the_threads_each_job_takes():

    assert local_slots(ExecutorConfig(parallel_jobs=2, threads_per_job=1), cores=16) == 2  # as set
    assert local_slots(ExecutorConfig(parallel_jobs=0, threads_per_job=1), cores=16) == 16
    assert local_slots(ExecutorConfig(parallel_jobs=0, threads_per_job=3), cores=16) == 5
    assert local_slots(ExecutorConfig(parallel_jobs=0, threads_per_job=4), cores=2) == 1
    assert local_slots(ExecutorConfig(parallel_jobs=0), cores=16) == 1  # torch takes every core
    assert local_slots(ExecutorConfig()) == 1  # the default: one job at a time
