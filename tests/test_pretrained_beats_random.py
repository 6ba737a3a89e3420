"""The small pretraining config's backbone against the same network at random init, on Fashion-MNIST.

The full small config runs (about 9 minutes here), then the linear probe and kNN of configs/transfer/
linear_fashion_mnist.yaml (all 60k / 10k images) for both backbones, seed 0. The margins asserted are
about half of the smallest ones measured over seeds 0, 1 and 2 (BENCHMARKS.md, "The small pretraining
config"), so that a run on another CPU (no bf16, other float rounding) still passes while a pretraining that
learns nothing does not.
"""
import json

import pytest

from tests.conftest import run_cli

MEASURED = {"linear": (1.25, 1.67, 2.50), "knn": (0.31, 1.01, 0.97)}  # pretrained EMA - random init, seeds 0, 1, 2
REQUIRED = {"linear": 0.6, "knn": 0.15}


@pytest.fixture(scope="module")
def top1(tmp_path_factory):
    root = tmp_path_factory.mktemp("pays")
    result = run_cli("pretrain", "--config", "configs/pretrain/fashion_mnist_resnet18.yaml",
                     f"run_dir={root / 'pretrain'}", "seed=0", timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = {}
    for task in ("linear", "knn"):
        for name, backbone in (("pretrained", str(root / "pretrain" / "checkpoints" / "last.pt")),
                               ("random", "random:resnet18")):
            run_dir = root / f"{task}_{name}"
            result = run_cli("transfer", task, "--backbone", backbone, "--config",
                             "configs/transfer/linear_fashion_mnist.yaml", f"run_dir={run_dir}", "seed=0",
                             f"cache_dir={root / 'cache'}", timeout=1200)
            assert result.returncode == 0, result.stderr[-2000:]
            scores[task, name] = json.loads((run_dir / "metrics.json").read_text())["metrics"]["top1"]
    return scores


@pytest.mark.slow
@pytest.mark.parametrize("task", ["linear", "knn"])
def test_pretrained_backbone_beats_random_init(top1, task):
    margin = top1[task, "pretrained"] - top1[task, "random"]
    assert margin >= REQUIRED[task], (f"{task}: pretrained {top1[task, 'pretrained']:.2f} vs random "
                                      f"{top1[task, 'random']:.2f}; measured margins {MEASURED[task]}")
