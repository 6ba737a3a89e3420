"""`python -m slurm evaluate`: named backbones x tasks x seeds as local jobs, the report that
compares them, and
a rerun that skips what exists."""

import json

import torch

from pretrain.networks import build_resnet
from tests.helpers import run_cli


def test_evaluate_runs_named_backbones_and_reports_them_side_by_side(tmp_path):

    torch.manual_seed(5)
    torch.save(build_resnet("resnet18").state_dict(), tmp_path / "tv.pth")
    args = [
        "evaluate",
        "--backbone",
        f"torchvision={tmp_path / 'tv.pth'}",
        "--backbone",
        "random:resnet18",
        "--task",
        "knn=configs/transfer/linear_fashion_mnist.yaml",
        "--seeds",
        "0",
        "1",
        "--root",
        str(tmp_path / "eval"),
        "task_overrides={knn: [data.limit_train=200, data.limit_test=50, "
        f"data.num_workers=0, 'cache_dir={tmp_path / 'cache'}']}}",
    ]
    result = run_cli("slurm", *args, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = {
        p.parent.parent.name + "/" + p.parent.name: json.loads(p.read_text())
        for p in (tmp_path / "eval" / "knn").glob("*/seed*/metrics.json")
    }
    assert set(records) == {
        "torchvision/seed0",
        "torchvision/seed1",
        "random-resnet18/seed0",
        "random-resnet18/seed1",
    }
    assert {r["backbone"]["name"] for r in records.values()} == {"torchvision", "random-resnet18"}
    md = (tmp_path / "eval" / "report" / "report.md").read_text()
    assert "| metric | random-resnet18 (baseline) | torchvision |" in md and "(n=2; 95% CI" in md
    rerun = run_cli("slurm", *args, timeout=600)
    assert rerun.returncode == 0 and rerun.stdout.count("done before, skipped") == 4
    bad = run_cli("slurm", *args, "--baseline", "moco")
    assert (
        bad.returncode == 2
        and "baseline 'moco' is none of the backbones (torchvision, random-resnet18)" in bad.stderr
    )


def test_a_failed_job_stops_new_ones_lets_the_running_one_finish_and_is_named_on_one_line(tmp_path):
    """Two local jobs run at once (configs/slurm/local.yaml): the one on a checkpoint of random
    bytes fails, the
    other finishes and keeps its metrics, no report is written, and the error names the failed step.
    """
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 64)
    args = [
        "evaluate",
        "--backbone",
        "random:resnet18",
        "--backbone",
        f"noise={tmp_path / 'noise.pth'}",
        "--task",
        "knn=configs/transfer/linear_fashion_mnist.yaml",
        "--root",
        str(tmp_path / "eval"),
        "task_overrides={knn: [data.limit_train=200, data.limit_test=50, data.num_workers=0, "
        f"'cache_dir={tmp_path / 'cache'}']}}",
    ]
    result = run_cli("slurm", *args, timeout=900)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith(
        "error: evaluate step knn/noise/seed0 failed: job "
    ), last
    assert "knn failed:" in last[0] and "noise.pth" in last[0]  # the job's own one-line message
    assert (tmp_path / "eval" / "knn" / "random-resnet18" / "seed0" / "metrics.json").exists()
    assert not (tmp_path / "eval" / "knn" / "noise" / "seed0" / "metrics.json").exists()
    assert not (tmp_path / "eval" / "report").exists()
    assert "knn/random-resnet18/seed0: finished in" in result.stdout
