"""Reliability: every bad config value refused up front, one writer per run dir, checkpoints that
survive a kill,
a failed write and a truncated file."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from common.cli import run_main
from common.errors import UserError
from common.rundir import RunDirLock
from pretrain.trainer import train
from tests.helpers import ROOT, TINY, assert_same_weights, final_state, run_cli, tiny_config

PRETRAIN = "configs/pretrain/fashion_mnist_resnet18.yaml"
# (entry point, key, bad value); each case must end in exit 2, one line naming the key, and nothing
# written
BAD_VALUES = [
    ("pretrain", "optim.batch_size", "-1"),
    ("pretrain", "loss.num_features", "0"),
    ("pretrain", "loss.kernel", "laplace"),
    ("pretrain", "optim.base_lr", "nan"),
    ("pretrain", "optim.weight_decay", "-1e-4"),
    ("pretrain", "optim.name", "adam"),
    ("pretrain", "optim.momentum", "1.5"),
    ("pretrain", "optim.epochs", "0"),
    ("pretrain", "loss.estimator", "nystrom"),
    ("pretrain", "loss.init_scale", "inf"),
    ("pretrain", "augment.crop_scale", "[0.9,0.2]"),
    ("pretrain", "augment.flip_p", "2"),
    ("pretrain", "augment.std", "[0.2,0.2,0]"),
    ("pretrain", "ema.target_tau", "1.1"),
    ("pretrain", "data.dataset", "cifar"),
    ("pretrain", "data.num_workers", "-2"),
    ("pretrain", "device", "tpu"),
    ("pretrain", "train.log_every", "0"),
    ("pretrain", "model.backbone", "vit_b16"),
    ("pretrain", "seed", "-3"),
    ("pretrain", "loss.draws", "0"),
    ("linear", "linear.epochs", "0"),
    ("linear", "linear.optimizer", "lbfgs"),
    ("linear", "linear.lr", "-0.1"),
    ("knn", "knn.k", "0"),
    ("knn", "knn.temperature", "0"),
    ("linear", "data.resize_ratio", "0.5"),
    ("segmentation", "schedule.iterations", "0"),
    ("segmentation", "data.dataset", "ade20k"),
    ("segmentation", "schedule.milestones", "[0.9,0.7]"),
    ("segmentation", "dropout", "1.0"),
    ("detection", "iterations", "1"),
    ("detection", "lr", "nan"),
    ("detection", "steps", "[0.5,1.5]"),
    ("depth", "steps", "0"),
    ("depth", "data.kind", "kitti"),
    ("depth", "batch_size", "0"),
    ("sweep", "seeds", "[-1]"),
    ("sweep", "tasks", "{segment: x.yaml}"),
    ("pipeline", "tasks", "{linear: missing.yaml}"),
    ("pipeline", "scenes", "{size: 8}"),
    ("pipeline", "weights", "final"),
    ("executor", "timeout_min", "0"),
    ("executor", "cluster", "kubernetes"),
    ("executor", "nodes", "0"),
    ("executor", "mem_gb", "-4"),
    ("executor", "parallel_jobs", "-1"),
    ("executor", "threads_per_job", "0"),
    ("finetune", "finetune.steps", "-1"),
    ("finetune", "finetune.batch_size", "0"),
    ("classify", "data.dataset", "imagenet"),
    ("classify", "linear.resize_ratio", "0"),
]
TASK_CONFIG = {
    "linear": "linear_fashion_mnist",
    "knn": "linear_fashion_mnist",
    "segmentation": "segmentation_scenes",
    "detection": "detection_scenes",
    "depth": "depth_scenes",
    "finetune": "finetune_fashion_mnist",
    "classify": "classify_digits",
}


def command(entry: str, key: str, value: str, tmp_path) -> tuple[str, list[str]]:
    """(package, argv) of one entry point with one bad value; everything it could write lies
    under tmp_path/out."""
    out = tmp_path / "out"
    if entry == "pretrain":
        return "pretrain", ["--config", PRETRAIN, f"run_dir={out}", *TINY, f"{key}={value}"]
    if entry in TASK_CONFIG:
        return "transfer", [
            entry,
            "--backbone",
            "random:resnet18",
            "--config",
            f"configs/transfer/{TASK_CONFIG[entry]}.yaml",
            f"run_dir={out}",
            f"{key}={value}",
        ]
    if entry == "sweep":
        sweep = tmp_path / "sweep.yaml"
        sweep.write_text(
            json.dumps(
                {
                    "run_root": str(out),
                    "backbones": ["random:resnet18"],
                    "tasks": {"knn": f"{ROOT}/configs/transfer/linear_fashion_mnist.yaml"},
                }
            )
        )
        return "slurm", ["sweep", "--config", str(sweep), f"{key}={value}"]
    if entry == "pipeline":
        return "slurm", [
            "pipeline",
            "--config",
            "configs/pipeline/demo.yaml",
            f"root={out}",
            f"{key}={value}",
        ]
    return "slurm", [
        "submit",
        "pretrain",
        "--config",
        PRETRAIN,
        f"run_dir={out}",
        *TINY,
        f"executor.folder={out}",
        f"executor.{key}={value}",
    ]


@pytest.mark.parametrize(
    "entry, key, value", BAD_VALUES, ids=[f"{e}-{k}={v}" for e, k, v in BAD_VALUES]
)
def test_a_bad_value_is_refused_on_one_line_with_exit_2_and_nothing_written(
    entry, key, value, tmp_path
):
    package, argv = command(entry, key, value, tmp_path)
    main = {
        "pretrain": "pretrain.__main__",
        "transfer": "transfer.__main__",
        "slurm": "slurm.__main__",
    }[package]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = run_main(__import__(main, fromlist=["main"]).main, argv)
    message = stderr.getvalue()
    assert status == 2, message
    assert message.count("\n") == 1 and message.startswith(f"error: config key '{key}' is "), (
        message
    )
    assert "must be" in message and "Traceback" not in message
    assert not (tmp_path / "out").exists()


def test_there_are_at_least_30_cases_over_every_entry_point():
    assert len(BAD_VALUES) >= 30
    assert {e for e, _, _ in BAD_VALUES} == {
        "pretrain",
        *TASK_CONFIG,
        "sweep",
        "pipeline",
        "executor",
    }


def test_the_command_line_prints_the_same_line(tmp_path):
    result = run_cli(
        "pretrain", "--config", PRETRAIN, f"run_dir={tmp_path / 'out'}", "optim.base_lr=nan"
    )
    assert result.returncode == 2
    assert result.stderr == "error: config key 'optim.base_lr' is nan; it must be a finite number\n"
    assert not (tmp_path / "out").exists()


# (name, entry point's argv with OUT for the folder it would write, the stderr line's start). Files:
# empty.pt (0 bytes), noise.pt (random bytes), tab.yaml (indented with a tab).
BAD_INPUTS = [
    *[
        (
            f"{task}-device=cuda",
            [
                "transfer",
                task,
                "--backbone",
                "random:resnet18",
                "--config",
                f"configs/transfer/{TASK_CONFIG[task]}.yaml",
                "run_dir=OUT",
                "device=cuda",
            ],
            "error: device=cuda but no GPU is visible; set device=cpu",
        )
        for task in TASK_CONFIG
    ],
    (
        "pretrain-device=cuda",
        ["pretrain", "--config", PRETRAIN, "run_dir=OUT", *TINY, "device=cuda"],
        "error: device=cuda but no GPU is visible; set device=cpu",
    ),
    (
        "linear-empty-checkpoint",
        [
            "transfer",
            "linear",
            "--backbone",
            "IN/empty.pt",
            "--config",
            "configs/transfer/linear_fashion_mnist.yaml",
            "run_dir=OUT",
        ],
        "error: checkpoint IN/empty.pt is unreadable (truncated or not a checkpoint)",
    ),
    (
        "finetune-noise-checkpoint",
        [
            "transfer",
            "finetune",
            "--backbone",
            "IN/noise.pt",
            "--config",
            "configs/transfer/finetune_fashion_mnist.yaml",
            "run_dir=OUT",
        ],
        "error: checkpoint IN/noise.pt is not a checkpoint (",
    ),
    (
        "export-noise-checkpoint",
        [
            "transfer",
            "export",
            "--checkpoint",
            "IN/noise.pt",
            "--format",
            "torchvision",
            "--out",
            "OUT/r18.pth",
        ],
        "error: checkpoint IN/noise.pt is not a checkpoint (",
    ),
    (
        "verify-empty-checkpoint",
        ["transfer", "verify", "--checkpoint", "IN/empty.pt"],
        "error: checkpoint IN/empty.pt is unreadable",
    ),
    (
        "pretrain-tab-yaml",
        ["pretrain", "--config", "IN/tab.yaml", "run_dir=OUT"],
        "error: config file IN/tab.yaml has a tab (line 2, column 1); YAML indents with spaces "
        "only",
    ),
    (
        "classify-tab-yaml",
        [
            "transfer",
            "classify",
            "--backbone",
            "random:resnet18",
            "--config",
            "IN/tab.yaml",
            "run_dir=OUT",
        ],
        "error: config file IN/tab.yaml has a tab (line 2, column 1)",
    ),
    (
        "evaluate-tab-yaml",
        ["slurm", "evaluate", "--config", "IN/tab.yaml", "--root", "OUT"],
        "error: config file IN/tab.yaml has a tab (line 2, column 1)",
    ),
]


NEEDS_NO_CUDA = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a device=cuda case needs a machine without CUDA"
)


@pytest.mark.parametrize(
    "argv, expected",
    [
        pytest.param(*case[1:], id=case[0], marks=NEEDS_NO_CUDA if "cuda" in case[0] else ())
        for case in BAD_INPUTS
    ],
)
def test_a_bad_input_is_refused_on_one_line_with_exit_2_and_nothing_written(
    argv, expected, tmp_path
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "empty.pt").write_bytes(b"")
    (inputs / "noise.pt").write_bytes(bytes(range(256)) * 16)
    (inputs / "tab.yaml").write_text("optim:\n\tbatch_size: 4\n")
    package, *argv = [
        a.replace("OUT", str(tmp_path / "out")).replace("IN", str(inputs)) for a in argv
    ]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = run_main(__import__(f"{package}.__main__", fromlist=["main"]).main, argv)
    message = stderr.getvalue()
    assert status == 2, message
    assert message.count("\n") == 1 and message.startswith(expected.replace("IN", str(inputs))), (
        message
    )
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# ------------------------------------------------------------------------------------ one writer


def start_pretraining(run_dir, *extra):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pretrain",
            "--config",
            PRETRAIN,
            f"run_dir={run_dir}",
            *TINY,
            "optim.epochs=400",
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_lock(run_dir, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lock = run_dir / ".lock"
        if lock.exists() and lock.read_text().strip():
            return json.loads(lock.read_text())
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.2)
    raise AssertionError("the first run never took its run dir")


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first = start_pretraining(run_dir)
    try:
        holder = wait_for_lock(run_dir, first)
        assert holder["pid"] == first.pid and holder["host"]
        second = run_cli(
            "pretrain", "--config", PRETRAIN, f"run_dir={run_dir}", *TINY, "optim.epochs=400"
        )
        assert second.returncode == 2
        assert second.stderr.startswith(
            f"error: run dir {run_dir} is in use by pid {first.pid} on "
        )
        assert second.stderr.count("\n") == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed run's lock file is still there, its lock is not: a requeued job takes over
    assert json.loads((run_dir / ".lock").read_text())["pid"] == first.pid
    third = run_cli(
        "pretrain",
        "--config",
        PRETRAIN,
        f"run_dir={run_dir}",
        *TINY,
        "optim.epochs=400",
        "optim.max_steps=2",
    )
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"taking over from pid {first.pid}" in (run_dir / "log.txt").read_text()


def test_a_task_holds_its_run_dir_too(tmp_path):

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from common.rundir import RunDirLock
        RunDirLock({str(tmp_path / "run")!r}).acquire()
        print('held', flush=True)
        time.sleep(120)
        """),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_cli(
            "transfer",
            "knn",
            "--backbone",
            "random:resnet18",
            "--config",
            "configs/transfer/linear_fashion_mnist.yaml",
            f"run_dir={tmp_path / 'run'}",
            "data.limit_train=100",
            "data.limit_test=50",
            f"cache_dir={tmp_path / 'cache'}",
        )
        assert result.returncode == 2 and f"is in use by pid {holder.pid}" in result.stderr
        assert not (tmp_path / "run" / "config.yaml").exists()
        with pytest.raises(UserError, match="is in use by pid"):
            RunDirLock(tmp_path / "run").acquire()
    finally:
        holder.kill()
        holder.wait()
    RunDirLock(tmp_path / "run").acquire().release()


# ------------------------------------------------------------------------------------ checkpoint
# faults

HANG_IN_SECOND_WRITE = """
import os, sys, time
from pathlib import Path
real_fsync, writes = os.fsync, []

def fsync(fd):  # the second checkpoint write hangs after its bytes are out, before the rename
    if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
        writes.append(fd)
        if len(writes) == 2:
            Path(sys.argv[1]).write_text("writing")
            time.sleep(600)
    real_fsync(fd)

os.fsync = fsync
from pretrain.trainer import train
from tests.helpers import tiny_config
train(tiny_config(sys.argv[2], "train.checkpoint_every=2"))
"""


def test_a_kill_during_a_checkpoint_write_keeps_the_previous_one_and_the_rerun_resumes_exactly(
    tmp_path,
):

    marker, run_dir = tmp_path / "writing", tmp_path / "killed"
    victim = subprocess.Popen(
        [sys.executable, "-c", HANG_IN_SECOND_WRITE, str(marker), str(run_dir)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()[1][
                -2000:
            ]
            time.sleep(0.2)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    assert list((run_dir / "checkpoints").glob(".last.pt.*.tmp")), "the write was not under way"
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    train(tiny_config(run_dir, "train.checkpoint_every=2"))
    log = (run_dir / "log.txt").read_text()
    assert (
        "resuming" in log
        and "at step 2 of 6" in log
        and "left by an interrupted checkpoint write" in log
    )
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    train(tiny_config(tmp_path / "straight", "train.checkpoint_every=2"))
    assert_same_weights(final_state(run_dir), final_state(tmp_path / "straight"))


def test_a_failed_write_stops_the_run_on_one_line_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):

    real_fsync, writes = os.fsync, []

    def full_disk(fd):
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            writes.append(fd)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(
        UserError,
        match=r"cannot write checkpoint .*last.pt: No space left on device; the last good "
        r"checkpoint is kept",
    ):
        train(tiny_config(tmp_path / "run", "train.checkpoint_every=2"))
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))
    monkeypatch.setattr(os, "fsync", real_fsync)
    # space is back: it resumes and ends
    train(tiny_config(tmp_path / "run", "train.checkpoint_every=2"))
    assert final_state(tmp_path / "run")["step"] == 6


def test_a_truncated_last_checkpoint_resumes_from_the_previous_one_or_is_refused_on_one_line(
    tmp_path,
):

    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, "train.checkpoint_every=2", "optim.max_steps=4"))
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    train(tiny_config(run_dir, "train.checkpoint_every=2"))
    assert (
        f"resuming from {run_dir / 'checkpoints' / 'previous.pt'} (step 4) instead"
        in (run_dir / "log.txt").read_text()
    )
    train(tiny_config(tmp_path / "straight", "train.checkpoint_every=2"))
    assert_same_weights(final_state(run_dir), final_state(tmp_path / "straight"))

    last.write_bytes(last.read_bytes()[:1000])
    (run_dir / "checkpoints" / "previous.pt").unlink()
    result = run_cli(
        "pretrain", "--config", PRETRAIN, f"run_dir={run_dir}", *TINY, "train.checkpoint_every=2"
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: checkpoint {last} cannot be read")


def test_a_slurm_task_uses_as_many_threads_as_cpus_it_was_given():
    code = (
        "import os, torch; from common.distributed import match_threads_to_allocation as m; "
        "before = torch.get_num_threads(); print(m(), torch.get_num_threads(), before, "
        "m({'SLURM_CPUS_PER_TASK': '3', 'OMP_NUM_THREADS': '2'}), m({}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "SLURM_CPUS_PER_TASK": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "1", str(os.cpu_count()), "None", "None"]
