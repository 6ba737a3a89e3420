"""The pipeline on a real SLURM cluster: one submission of the whole dependency graph, its status, a failed
upstream step and the rerun that submits only what is missing."""
import json
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli

pytestmark = pytest.mark.slow


def write_pipeline(tmp_path: Path, pretrain_extra: list[str]) -> Path:
    executor = tmp_path / "executor.yaml"
    executor.write_text(json.dumps({
        "cluster": "slurm", "timeout_min": 20, "cpus_per_task": 1,
        # pretraining and kNN as 2-task jobs (gloo on CPU), the CPU tools as one task
        "profiles": {"report": {"timeout_min": 5}, "pretrain": {"timeout_min": 15, "tasks_per_node": 2},
                     "knn": {"tasks_per_node": 2}}}))
    config = tmp_path / "pipeline.json"
    config.write_text(json.dumps({
        "root": str(tmp_path / "root"), "executor": str(executor),
        "pretrain_config": "configs/pretrain/fashion_mnist_resnet18.yaml",
        "pretrain_overrides": [*TINY, "optim.epochs=1", *pretrain_extra],
        "use_scenes": False, "supervised": False, "tasks": {"knn": "configs/transfer/linear_fashion_mnist.yaml"},
        "task_overrides": {"knn": ["data.limit_train=300", "data.limit_test=100", "data.num_workers=0",
                                   f"cache_dir={tmp_path / 'cache'}"]},
        "seeds": [0]}))
    return config


def wait_until_settled(root: Path, timeout_s: float = 900) -> dict:
    """Poll the graph until no job is pending or running (NEVER counts as settled)."""
    from slurm import graph
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = graph.states(graph.load(root))
        if all(state not in graph.LIVE for state, _ in states.values()):
            return states
        time.sleep(2)
    raise AssertionError(f"the graph did not settle: {states}")


def manifest_ids(root: Path) -> dict:
    return {job["name"]: job["job_id"] for job in json.loads((root / "pipeline.json").read_text())["jobs"]}


@pytest.mark.timeout(2400)
def test_one_submission_a_failed_upstream_step_and_a_rerun_that_submits_only_what_is_missing(slurm_cluster, tmp_path):
    root = tmp_path / "root"
    # 8 images, a batch of 16: pretraining fails in its job (at run time, not when the config loads)
    broken = write_pipeline(tmp_path, ["data.limit=8"])
    started = time.monotonic()
    result = run_cli("slurm", "pipeline", "--config", str(broken), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "one dependency graph" in result.stdout
    assert not (root / "pretrain" / "metrics.json").exists()  # returned before the first job ended
    first = manifest_ids(root)
    assert set(first) == {"pretrain", "export", "verify", "knn/pretrained/seed0", "knn/random/seed0", "report"}
    assert all(first.values())

    states = wait_until_settled(root)
    assert states["pretrain"][0] == "FAILED" and "log " in states["pretrain"][1]
    assert states["knn/random/seed0"][0] == "DONE"  # needs nothing that failed
    for name in ("export", "verify", "knn/pretrained/seed0", "report"):
        assert states[name][0] == "NEVER" and "needs pretrain, which ended FAILED" in states[name][1], states[name]
    status = run_cli("slurm", "status", str(root))
    assert status.returncode == 0 and "NEVER" in status.stdout and "needs pretrain" in status.stdout

    fixed = write_pipeline(tmp_path, [])
    result = run_cli("slurm", "pipeline", "--config", str(fixed), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    second = manifest_ids(root)
    assert second["knn/random/seed0"] == first["knn/random/seed0"]  # done: not submitted again
    assert all(second[name] != first[name] for name in ("pretrain", "export", "verify", "knn/pretrained/seed0",
                                                         "report"))
    states = wait_until_settled(root)
    assert all(state == "DONE" for state, _ in states.values()), states
    table = (root / "report" / "report.md").read_text()
    assert "### knn ·" in table and "| top1 |" in table and "| random-resnet18 (baseline) | ssl-hsic |" in table
    record = json.loads((root / "knn" / "pretrained" / "seed0" / "metrics.json").read_text())
    assert record["backbone"]["weights"] == "ema" and record["world_size"] == 2
    assert (root / "pretrain" / "log.txt").read_text().count("processes: 2") >= 1
    assert json.loads((root / "export" / "verified.json").read_text())["arch"] == "resnet18"
    assert time.monotonic() - started < 1800


def test_bad_profiles_and_batches_are_refused_before_anything_is_submitted(tmp_path):
    config = write_pipeline(tmp_path, [])
    executor = tmp_path / "executor.yaml"
    executor.write_text(json.dumps({"cluster": "slurm", "profiles": {"pretrian": {"nodes": 2}}}))
    result = run_cli("slurm", "pipeline", "--config", str(config))
    assert result.returncode == 2 and result.stderr.startswith("error: config key 'profiles' is ")
    assert "a mapping of steps" in result.stderr and result.stderr.count("\n") == 1
    executor.write_text(json.dumps({"cluster": "slurm", "profiles": {"pretrain": {"nodes": 3}}}))
    result = run_cli("slurm", "pipeline", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr == ("error: optim.batch_size=16 (the global batch) does not divide among the pretrain "
                             "profile's 3 processes (nodes x tasks_per_node); choose a multiple of 3\n")
    executor.write_text(json.dumps({"cluster": "slurm", "profiles": {"knn": {"nodes": 0}}}))
    result = run_cli("slurm", "pipeline", "--config", str(config))
    assert result.returncode == 2 and result.stderr.startswith("error: executor profile 'knn': config key 'nodes' is 0")
    result = run_cli("slurm", "pipeline", "--config", str(config), "pretrain_overrides=[data.root=/nonexistent]")
    assert result.returncode == 2 and "pretraining data /nonexistent does not exist" in result.stderr
    assert not (tmp_path / "root").exists()


def test_a_missing_partition_is_refused_before_anything_is_submitted(slurm_cluster, tmp_path):
    config = write_pipeline(tmp_path, [])
    (tmp_path / "executor.yaml").write_text(json.dumps({"cluster": "slurm", "profiles": {"knn": {"partition": "a100"}}}))
    result = run_cli("slurm", "pipeline", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: SLURM partition 'a100' does not exist on this cluster")
    assert not (tmp_path / "root" / "pipeline.json").exists()
