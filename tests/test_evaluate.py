"""`python -m slurm evaluate`: named backbones x tasks x seeds as local jobs, the report that compares them, and
a rerun that skips what exists."""
import json

import torch

from tests.conftest import run_cli


def test_evaluate_runs_named_backbones_and_reports_them_side_by_side(tmp_path):
    from pretrain.networks import build_resnet
    torch.manual_seed(5)
    torch.save(build_resnet("resnet18").state_dict(), tmp_path / "tv.pth")
    args = ["evaluate", "--backbone", f"torchvision={tmp_path / 'tv.pth'}", "--backbone", "random:resnet18",
            "--task", "knn=configs/transfer/linear_fashion_mnist.yaml", "--seeds", "0", "1", "--root",
            str(tmp_path / "eval"), "task_overrides={knn: [data.limit_train=200, data.limit_test=50, "
            f"data.num_workers=0, 'cache_dir={tmp_path / 'cache'}']}}"]
    result = run_cli("slurm", *args, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = {p.parent.parent.name + "/" + p.parent.name: json.loads(p.read_text())
               for p in (tmp_path / "eval" / "knn").glob("*/seed*/metrics.json")}
    assert set(records) == {"torchvision/seed0", "torchvision/seed1", "random-resnet18/seed0", "random-resnet18/seed1"}
    assert {r["backbone"]["name"] for r in records.values()} == {"torchvision", "random-resnet18"}
    md = (tmp_path / "eval" / "report" / "report.md").read_text()
    assert "| metric | random-resnet18 (baseline) | torchvision |" in md and "(n=2; 95% CI" in md
    rerun = run_cli("slurm", *args, timeout=600)
    assert rerun.returncode == 0 and rerun.stdout.count("done before, skipped") == 4
    bad = run_cli("slurm", *args, "--baseline", "moco")
    assert bad.returncode == 2 and "baseline 'moco' is none of the backbones (torchvision, random-resnet18)" in bad.stderr
