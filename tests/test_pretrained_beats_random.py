"""The small pretraining config's backbone against the same network at random init, seed 0.

The full small config runs once (about 9 minutes here); then the linear probe and kNN of configs/transfer/
linear_fashion_mnist.yaml (all 60k / 10k Fashion-MNIST images) and the segmentation of configs/transfer/
segmentation_scenes.yaml (mmsegmentation, 1000 iterations on the default generated scenes) run for both
backbones. Each margin asserted is about half the smallest one measured over seeds 0, 1 and 2 (BENCHMARKS.md,
bench/margins.py), so that a run on another CPU (no bf16, other float rounding) still passes while a
pretraining that learns nothing does not. Detection is not here: its margins over seeds 0-2 (+1.81, +0.34,
-1.50 bbox AP, BENCHMARKS.md) do not show that the small config's backbone beats random init there.
"""
import json

import pytest

from tests.conftest import run_cli
from slurm.pipeline import PipelineConfig, scene_overrides

# pretrained (EMA network) - random init, seeds 0, 1, 2; the pretraining seed is also the task's seed
MEASURED = {"linear": (1.25, 1.67, 2.50), "knn": (0.31, 1.01, 0.97), "segmentation": (0.90, 3.35, 0.42)}
REQUIRED = {"linear": 0.6, "knn": 0.15, "segmentation": 0.2}
METRIC = {"linear": "top1", "knn": "top1", "segmentation": "mIoU"}
CONFIG = {"linear": "configs/transfer/linear_fashion_mnist.yaml", "knn": "configs/transfer/linear_fashion_mnist.yaml",
          "segmentation": "configs/transfer/segmentation_scenes.yaml"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from transfer.scenes import write_all
    root = tmp_path_factory.mktemp("pays")
    result = run_cli("pretrain", "--config", "configs/pretrain/fashion_mnist_resnet18.yaml",
                     f"run_dir={root / 'pretrain'}", "seed=0", timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    write_all(root / "scenes", **PipelineConfig().scenes)  # the main job's scenes
    return root


def score(root, task: str, backbone: str, name: str) -> float:
    run_dir = root / f"{task}_{name}"
    extra = [f"cache_dir={root / 'cache'}"] if task in ("linear", "knn") else scene_overrides(task, root / "scenes")
    result = run_cli("transfer", task, "--backbone", backbone, "--config", CONFIG[task], f"run_dir={run_dir}",
                     "seed=0", *extra, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((run_dir / "metrics.json").read_text())["metrics"][METRIC[task]]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["linear", "knn", "segmentation"])
def test_pretrained_backbone_beats_random_init(workspace, task):
    pretrained = score(workspace, task, str(workspace / "pretrain" / "checkpoints" / "last.pt"), "pretrained")
    random_init = score(workspace, task, "random:resnet18", "random")
    assert pretrained - random_init >= REQUIRED[task], (
        f"{task} {METRIC[task]}: pretrained {pretrained:.2f} vs random init {random_init:.2f}; "
        f"margins measured over seeds 0-2: {MEASURED[task]}")
