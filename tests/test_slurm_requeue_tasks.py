"""Transfer tasks preempted on the real one-node SLURM cluster: each task runs as a job
(slurm.jobs.StepJob, as `slurm submit` runs it), is requeued with `scontrol requeue` once a
resumable state of it is on disk, is released, resumes from its own state and ends with the metrics
and the weights of the same config run without interruption (a second job: both hold one CPU, so one
torch thread, and the tasks are bitwise reproducible on the CPU).

One module fixture runs all six jobs (the node's two CPUs run two at a time): depth (FCRN,
depth_last.pt), fine-tuning (the finetune task: two candidates, preempted in the second once the
first is scored) and segmentation (mmseg, a two-lr selection on held-out images, preempted in the
second candidate).

`scontrol requeue` sends SIGTERM, which submitit ignores, and SIGKILL KillWait (5 s) later: each
task is sized so that the job still trains for well over 5 s after its trigger, in the same
candidate, on an idle machine, and the kill lands there."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pretrain.networks import build_resnet
from slurm.executor import ExecutorConfig, build_executor
from slurm.jobs import StepJob
from slurm.steps import Job
from tests.helpers import ROOT
from tests.test_slurm import release_requeued

pytestmark = pytest.mark.slow

# The six jobs take 2.5 minutes on a 2-core machine (4 under a load of 5); the driver gives up
# before the timeout.
DRIVE_S = 600
TIMEOUT_S = 900
FINISHED = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
)


def depth_task(scenes: Path) -> dict:
    """12 steps of batch 4 at 64 px (1 s a step, 1.5 s a 400 MB save), saved every 3: preempted at
    step 3's
    checkpoint, with 9 steps and 3 saves (13 s) to go."""
    return dict(
        step="depth",
        config="configs/transfer/depth_scenes.yaml",
        overrides=[
            f"data.root={scenes / 'nyu'}",
            "data.resize=[64,64]",
            "data.crop=[64,64]",
            "data.num_workers=0",
            "batch_size=4",
            "steps=12",
            "checkpoint_every=3",
            "log_every=1",
        ],
        trigger="depth_last.pt",
        leftover=".depth_last.pt.killed.tmp",
    )


def finetune_task(scenes: Path) -> dict:
    """Half of 600 Fashion-MNIST images labelled (300: 6 steps of 50 an epoch of 1.5 s at 32 px),
    100 held out; the grid: 2 and 8 epochs at lr 0.02, saved after every epoch (checkpoint_steps=6).
    Preempted at the second
    candidate's first checkpoint, the first one scored, with 7 epochs (10 s) of it to go."""
    return dict(
        step="finetune",
        config="configs/transfer/finetune_fashion_mnist.yaml",
        overrides=[
            "data.limit_train=600",
            "data.limit_test=200",
            "data.fractions=[0.5]",
            "data.heldout=100",
            "images.size=32",
            "images.num_workers=0",
            "finetune.batch_size=50",
            "finetune.lr_grid=[0.02]",
            "finetune.epochs_grid=[2,8]",
            "finetune.checkpoint_steps=6",
            "finetune.eval_batch_size=100",
        ],
        trigger="finetune/50%/lr0.02_ep8_wd0.pt",
        leftover="finetune/50%/.lr0.02_ep8_wd0.pt.killed.tmp",
    )


def segmentation_task(scenes: Path) -> dict:
    """96 iterations of batch 2 (64 px crops, a 32-channel head; 0.1 s each) per run, saved every
    16: lr 0.01 and 0.05 chosen on 4 held-out training images, then the chosen one trained on all.
    Preempted at the second
    candidate's first checkpoint, the first one scored, with 80 iterations (10 s) of it to go."""
    return dict(
        step="segmentation",
        config="configs/transfer/segmentation_scenes.yaml",
        overrides=[
            f"data.root={scenes / 'voc' / 'VOC2012'}",
            "data.scale=[96,96]",
            "data.crop=[64,64]",
            "data.num_workers=0",
            "schedule.iterations=96",
            "schedule.batch_size=2",
            "schedule.checkpoint_interval=16",
            "schedule.log_interval=16",
            "head_channels=32",
            "schedule.lr_grid=[0.01,0.05]",
            "data.heldout=4",
        ],
        trigger="select/lr0.05/mmseg/last_checkpoint",
        leftover="select/lr0.05/mmseg/.iter_16.pth.tmp",
    )


TASKS = {"depth": depth_task, "finetune": finetune_task, "segmentation": segmentation_task}
# Submission order, the longest jobs first, so that the two CPUs stay busy to the end; a requeued
# job, once released, runs before the later submissions.
ORDER = (
    ("segmentation", "job"),
    ("segmentation", "straight"),
    ("finetune", "job"),
    ("depth", "job"),
    ("finetune", "straight"),
    ("depth", "straight"),
)


@dataclass
class Run:
    task: dict
    job: object = None  # the job that is preempted
    straight: object = None  # the same config, never interrupted
    run_dir: Path = None
    straight_dir: Path = None
    requeued_at: float | None = None  # when `scontrol requeue` was sent (monotonic)
    problems: list = field(default_factory=list)
    info: str = ""  # `scontrol show job` of the preempted job once it finished
    states: dict = field(default_factory=dict)  # job id -> its last JobState, for both jobs
    job_log: str = ""  # its submitit stdout + stderr (both runs: submitit appends)


def job_states(cluster) -> dict[str, str]:
    """JobId -> JobState of every job the controller knows (finished ones stay listed for
    MinJobAge)."""
    text = cluster.scontrol("show", "job", check=False).stdout
    return {
        m.group(1): m.group(2) for m in re.finditer(r"JobId=(\d+) .*?JobState=(\S+)", text, re.S)
    }


@pytest.fixture(scope="module")
def preempted(slurm_cluster, scenes, tmp_path_factory):
    """Submit, for each task, the job to preempt and its uninterrupted twin; requeue each preempted
    job when its
    trigger file appears, release it from its BeginTime wait, and wait for all six."""

    root = tmp_path_factory.mktemp("requeue")
    backbone = root / "backbone.pth"  # one backbone file for every run (a torchvision state_dict)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(build_resnet("resnet18").state_dict(), backbone)
    config = OmegaConf.structured(
        ExecutorConfig(
            cluster="slurm",
            folder=str(root / "jobs"),
            timeout_min=30,
            cpus_per_task=1,
            signal_delay_s=30,
            max_num_timeout=0,
        )
    )
    executor = build_executor(config)
    runs = {name: Run(make(scenes)) for name, make in TASKS.items()}

    def submit(run: Run, run_dir: Path):
        job = Job(
            run.task["step"],
            str(ROOT / run.task["config"]),
            list(run.task["overrides"]),
            str(run_dir),
            {"backbone": str(backbone)},
        )
        return executor.submit(StepJob(job, config.signal_delay_s))

    for name, run in runs.items():
        run.run_dir, run.straight_dir = root / name / "preempted", root / name / "straight"
        # as a kill in the middle of a checkpoint write leaves it
        planted = run.run_dir / run.task["leftover"]
        planted.parent.mkdir(parents=True)
        planted.write_bytes(b"half-written")
    for name, which in ORDER:
        run = runs[name]
        setattr(run, which, submit(run, run.run_dir if which == "job" else run.straight_dir))
    deadline = time.monotonic() + DRIVE_S
    while time.monotonic() < deadline:
        states = job_states(slurm_cluster)
        for name, run in runs.items():
            state = states.get(str(run.job.job_id), "")
            if run.requeued_at is None and (run.run_dir / run.task["trigger"]).exists():
                if state == "RUNNING":
                    slurm_cluster.scontrol("requeue", str(run.job.job_id))
                    run.requeued_at = time.monotonic()
                elif state in FINISHED:
                    run.requeued_at = float("nan")
                    run.problems.append(
                        f"{name}: job {run.job.job_id} ended ({state}) before it could be requeued"
                    )
            elif run.requeued_at is not None and state == "PENDING":
                release_requeued(slurm_cluster, run.job.job_id, timelimit_min=30)
        if all(
            states.get(str(job.job_id), "") in FINISHED
            for run in runs.values()
            for job in (run.job, run.straight)
        ):
            break
        time.sleep(0.2)
    for name, run in runs.items():
        run.info = slurm_cluster.scontrol("show", "job", str(run.job.job_id), check=False).stdout
        run.job_log = "".join(
            Path(p).read_text(errors="replace")
            for p in (run.job.paths.stdout, run.job.paths.stderr)
            if Path(p).exists()
        )
        for job in (run.job, run.straight):
            run.states[job.job_id] = states.get(str(job.job_id), "")
            if run.states[job.job_id] not in FINISHED:
                run.problems.append(
                    f"{name}: job {job.job_id} not finished after {DRIVE_S} s: "
                    f"{slurm_cluster.scontrol('show', 'job', str(job.job_id), check=False).stdout}"
                )
    slurm_cluster.cancel_jobs()  # nothing outlives a failed drive
    return runs


def check_resumed_like_straight(run: Run) -> tuple[dict, dict, str]:
    """The checks every task shares; returns both metrics.json records and the preempted run's
    log.txt."""
    assert not run.problems, "\n".join(run.problems)
    for job in (run.job, run.straight):
        stderr = Path(job.paths.stderr)
        tail = (
            stderr.read_text(errors="replace").strip().splitlines()[-5:] if stderr.exists() else []
        )
        assert run.states[job.job_id] == "COMPLETED", (
            f"job {job.job_id} {run.states[job.job_id]}: {tail}"
        )
        job.result()  # raises with the job's error if it failed
    assert run.requeued_at is not None, f"{run.task['trigger']} never appeared"
    assert "Restarts=1" in run.info, run.info  # requeued once, by `scontrol requeue`
    assert (
        run.job_log.count("Starting with JobEnvironment") == 2
        and "Bypassing signal SIGTERM" in run.job_log
    )
    log = (run.run_dir / "log.txt").read_text()
    assert "taking over from" in log  # the requeued job took the run dir of the killed one
    assert (
        f"removing {run.run_dir / run.task['leftover']}, left by an interrupted checkpoint write"
        in log
    )
    assert not list(run.run_dir.rglob(".*.tmp")), "a half-written file was left behind"
    preempted, straight = (
        json.loads((d / "metrics.json").read_text()) for d in (run.run_dir, run.straight_dir)
    )
    assert preempted["metrics"] == straight["metrics"]  # bitwise: 1 thread in both jobs
    return preempted, straight, log


def after_takeover(log: str) -> str:
    return log.split("taking over from", 1)[1]


def assert_same_losses(log: str, straight_log: str, pattern: str) -> None:
    """Every loss the preempted run logged (before the kill, and again after the resume) is the
    uninterrupted run's at the same point, and it logged every point."""
    straight = {m.group(1): m.group(2) for m in re.finditer(pattern, straight_log)}
    logged = [(m.group(1), m.group(2)) for m in re.finditer(pattern, log)]
    assert straight and {point for point, _ in logged} == set(straight)
    assert [(p, v) for p, v in logged if straight[p] != v] == []


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if isinstance(a[k], torch.Tensor) and not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.timeout(TIMEOUT_S)
def test_depth_requeued_mid_run_resumes_to_the_uninterrupted_metrics(preempted):
    run = preempted["depth"]
    _, _, log = check_resumed_like_straight(run)
    resumed_at = int(re.search(r"depth: resuming at step (\d+) of 12", log).group(1))
    assert resumed_at in (3, 6, 9)
    assert_same_losses(
        log, (run.straight_dir / "log.txt").read_text(), r"depth: step (\d+)/12 berHu (\S+)"
    )
    weights = [
        torch.load(d / "depth_last.pt", weights_only=True) for d in (run.run_dir, run.straight_dir)
    ]
    assert weights[0]["step"] == weights[1]["step"] == 12
    assert_same_tensors(weights[0]["model"], weights[1]["model"], "depth model")


@pytest.mark.timeout(TIMEOUT_S)
def test_finetune_requeued_mid_selection_resumes_without_retraining_scored_candidates(preempted):
    run = preempted["finetune"]
    record, straight, log = check_resumed_like_straight(run)
    # each candidate's held-out top-1, the choice
    assert record["fractions"] == straight["fractions"]
    resumed = after_takeover(log)
    assert re.search(r"finetune: lr0\.02_ep8_wd0 resumes at epoch [1-7] of 8", resumed)
    # the scored first candidate is read back, not trained again
    assert "lr0.02_ep2_wd0 epoch" not in resumed
    # the resumed candidate's losses, epoch by epoch (its weights are kept only if it is the one
    # chosen)
    assert_same_losses(
        log, (run.straight_dir / "log.txt").read_text(), r"finetune: (\S+ epoch \d+/\d+) loss (\S+)"
    )
    chosen = record["fractions"]["50%"]["chosen"]
    name = f"lr{chosen['lr']:g}_ep{chosen['epochs']}_wd{chosen['weight_decay']:g}.pt"
    assert sorted(p.name for p in (run.run_dir / "finetune" / "50%").glob("*.pt")) == [name]
    weights = [
        torch.load(d / "finetune" / "50%" / name, weights_only=True)["model"]
        for d in (run.run_dir, run.straight_dir)
    ]
    assert_same_tensors(*weights, f"fine-tuned {name}")


@pytest.mark.timeout(TIMEOUT_S)
def test_segmentation_requeued_mid_selection_resumes_to_the_uninterrupted_weights(preempted):
    run = preempted["segmentation"]
    record, straight, log = check_resumed_like_straight(run)
    assert (
        record["heldout_mIoU"] == straight["heldout_mIoU"]
        and record["chosen_lr"] == straight["chosen_lr"]
    )
    resumed = after_takeover(log)
    assert re.search(
        rf"mmseg: resumes from {run.run_dir}/select/lr0\.05/mmseg/iter_(16|32|48|64|80|96)\.pth",
        resumed,
    )
    # the scored first candidate is read back, not trained again
    assert "lr0.01/mmseg" not in resumed
    # mmseg's metrics are rounded to 0.01 and these short runs predict mostly background: compare
    # the weights too
    for part in ("select/lr0.01/mmseg", "select/lr0.05/mmseg", "mmseg"):
        states = [
            torch.load(d / part / "iter_96.pth", map_location="cpu", weights_only=False)[
                "state_dict"
            ]
            for d in (run.run_dir, run.straight_dir)
        ]
        assert_same_tensors(*states, part)
        assert sorted(p.name for p in (run.run_dir / part).glob("*.pth")) == ["iter_96.pth"]
