"""The main job on a tiny config, through the local submitit executor, and its rerun."""

import json

import pytest
import yaml

from tests.helpers import TINY, run_cli

pytestmark = pytest.mark.slow


@pytest.mark.timeout(2400)
def test_tiny_pipeline_runs_end_to_end_and_a_rerun_skips_everything(tmp_path):
    cache = tmp_path / "cache"
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        json.dumps(
            {
                "root": str(tmp_path / "demo"),
                "executor": "configs/slurm/local.yaml",
                "pretrain_config": "configs/pretrain/fashion_mnist_resnet18.yaml",
                "pretrain_overrides": [*TINY, "optim.epochs=1", "train.deterministic=false"],
                "scenes": {"train": 8, "test": 4, "size": 96, "seed": 0},
                "task_overrides": {
                    "linear": [
                        "data.limit_train=300",
                        "data.limit_test=100",
                        "data.num_workers=0",
                        "linear.epochs=2",
                        f"cache_dir={cache}",
                    ],
                    "knn": [
                        "data.limit_train=300",
                        "data.limit_test=100",
                        "data.num_workers=0",
                        f"cache_dir={cache}",
                    ],
                    "segmentation": [
                        "schedule.iterations=2",
                        "schedule.batch_size=2",
                        "data.scale=[96,96]",
                        "data.crop=[64,64]",
                        "data.num_workers=0",
                        "head_channels=32",
                    ],
                    "detection": [
                        "iterations=2",
                        "batch_size=2",
                        "warmup_iters=1",
                        "data.min_size_train=[96]",
                        "data.min_size_test=96",
                        "data.num_workers=0",
                    ],
                    "depth": [
                        "steps=2",
                        "batch_size=4",
                        "data.resize=[96,96]",
                        "data.crop=[96,96]",
                        "data.num_workers=0",
                    ],
                    "finetune": [
                        "data.limit_train=600",
                        "data.limit_test=100",
                        "data.fractions=[0.1]",
                        "data.heldout=50",
                        "images.size=16",
                        "images.num_workers=0",
                        "finetune.batch_size=20",
                        "finetune.lr_grid=[0.05]",
                        "finetune.epochs_grid=[1]",
                    ],
                    "classify/digits": [
                        "images.size=16",
                        "finetune.batch_size=100",
                        "finetune.lr_grid=[0.05]",
                        "finetune.epochs_grid=[1]",
                        "linear.max_iter=50",
                        f"cache_dir={cache}",
                    ],
                },
            }
        )
    )
    result = run_cli("slurm", "pipeline", "--config", str(config), timeout=2000)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    numerics = [
        line for line in result.stdout.splitlines() if line.startswith("[pipeline] numerics: ")
    ]
    # said before and after the run
    assert len(numerics) == 2 and "pretraining in fp32" in numerics[0]
    root = tmp_path / "demo"
    table = (root / "report" / "report.md").read_text()
    for key, metric in (
        ("linear", "top1"),
        ("knn", "top1"),
        ("segmentation", "mIoU"),
        ("detection", "bbox.AP"),
        ("depth", "rms"),
        ("finetune", "top1@10%"),
        ("classify/digits", "linear.top1"),
        ("classify/digits", "finetune.top1"),
    ):
        task = key.split("/")[0]
        assert f"### {task} ·" in table and f"| {metric} " in table
        for kind, name in (
            ("pretrained", "ssl-hsic"),
            ("random", "random-resnet18"),
            ("supervised", "supervised"),
        ):
            record = json.loads((root / key / kind / "seed0" / "metrics.json").read_text())
            assert record["task"] == task and record["backbone"]["name"] == name
            assert record["backbone"]["weights"] == {"pretrained": "ema", "random": "random"}.get(
                kind, "as-is"
            )
    assert (root / "report" / "pretrain_pretrain.png").exists() and (
        root / "report" / "task_depth.png"
    ).exists()
    assert json.loads((root / "export" / "backbone_ema.pkl.json").read_text())["arch"] == "resnet18"
    assert_ran_as_the_graph_allows(
        json.loads((root / "report" / "timings.json").read_text()), jobs=5 + 21, slots=2
    )
    for record in root.glob("*/*/seed0/metrics.json"):  # local.yaml: one thread per job
        assert json.loads(record.read_text())["threads"] == 1, record
    rerun = run_cli("slurm", "pipeline", "--config", str(config), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # pretrain, supervised, scenes, export, verify + 7 tasks x 3 backbones
    assert rerun.stdout.count("done before, skipped") == 5 + 21


def assert_ran_as_the_graph_allows(timings: dict, jobs: int, slots: int) -> None:
    """Every job started after the jobs it needs had ended, never more than `slots` ran at once, and
    some did
    run side by side."""
    assert timings["parallel_jobs"] == slots and len(timings["jobs"]) == jobs
    spans = timings["jobs"]
    for name, span in spans.items():
        assert span["start_s"] < span["end_s"], name
        for need in span["needs"]:
            assert spans[need]["end_s"] <= span["start_s"], f"{name} started before {need} ended"
    at_once = [
        sum(other["start_s"] <= span["start_s"] < other["end_s"] for other in spans.values())
        for span in spans.values()
    ]
    assert max(at_once) == slots


@pytest.mark.timeout(1200)
def test_pretraining_once_per_seed_pairs_each_seed_with_its_own_backbone_and_pools_the_recipe(
    tmp_path,
):
    """pretrain_per_seed: seed k pretrains under pretrain/seedK (seed=k) and its task runs evaluate
    that
    checkpoint; the report pools the recipe's seeds into one column (n = 2), as random init's."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        json.dumps(
            {
                "root": str(tmp_path / "demo"),
                "pretrain_config": "configs/pretrain/fashion_mnist_resnet18.yaml",
                "pretrain_overrides": [*TINY, "optim.epochs=1"],
                "use_scenes": False,
                "supervised": False,
                "tasks": {"knn": "configs/transfer/linear_fashion_mnist.yaml"},
                "task_overrides": {
                    "knn": [
                        "data.limit_train=300",
                        "data.limit_test=100",
                        "data.num_workers=0",
                        f"cache_dir={tmp_path / 'cache'}",
                    ]
                },
                "seeds": [0, 1],
                "pretrain_per_seed": True,
            }
        )
    )
    result = run_cli("slurm", "pipeline", "--config", str(config), timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    numerics = [
        line for line in result.stdout.splitlines() if line.startswith("[pipeline] numerics: ")
    ]
    # said before and after the run
    assert len(numerics) == 2 and "pretraining in fp32" in numerics[0]
    root = tmp_path / "demo"
    fingerprints = set()
    for seed in (0, 1):
        assert (
            yaml.safe_load((root / "pretrain" / f"seed{seed}" / "config.yaml").read_text())["seed"]
            == seed
        )
        record = json.loads(
            (root / "knn" / "pretrained" / f"seed{seed}" / "metrics.json").read_text()
        )
        assert record["backbone"]["path"] == str(
            root / "pretrain" / f"seed{seed}" / "checkpoints" / "last.pt"
        )
        fingerprints.add(record["backbone"]["fingerprint"])
    assert len(fingerprints) == 2
    table = (root / "report" / "report.md").read_text()
    assert "| metric | random-resnet18 (baseline) | ssl-hsic |" in table and table.count("n=2") >= 2
    assert (root / "report" / "pretrain_pretrain_seed1.png").exists()


def test_a_backbone_named_like_another_is_refused_before_anything_runs(tmp_path):
    result = run_cli(
        "slurm",
        "pipeline",
        "--config",
        "configs/pipeline/demo.yaml",
        "--dry-run",
        f"root={tmp_path / 'demo'}",
        "backbones=[supervised=/x.pth]",
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert (
        result.stderr.startswith("error: backbone names must differ from each other")
        and "'supervised']" in result.stderr
    )
    assert not (tmp_path / "demo").exists()
