"""A new task is one module, one registry entry and its default config: in a copy of the packages, a
toy task added that way runs through `python -m transfer`, a sweep (local jobs, then status and
collect) and the pipeline's dry
run, and the report reads its metric's direction from the registry."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.seeds import derive_seed
from tests.helpers import ROOT
from transfer.backbone import resolve_backbone

TOY_MODULE = '''"""A toy task: the mean L2 norm of the backbone's features of a few seeded random images."""
from dataclasses import dataclass

import torch

from common.checks import POSITIVE_INT, checked
from common.seeds import derive_seed
from transfer.runner import TaskResult
from transfer.tasks.contract import TaskConfig


@dataclass
class Config(TaskConfig):
    run_dir: str = "runs/toy"
    images: int = checked(4, POSITIVE_INT)
    size: int = checked(32, POSITIVE_INT)


EXAMPLES = "examples:\\n  python -m transfer toy --backbone random:resnet18 --config configs/transfer/toy_default.yaml"


def prepare(config: Config) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "task.split"))
    return torch.rand(config.images, 3, config.size, config.size, generator=generator)


def run(config: Config, backbone, task_run, images: torch.Tensor) -> TaskResult:
    with torch.no_grad():
        features = backbone.model().eval()(images)
    return TaskResult({"norm": features.norm(dim=1).mean().item()}, "toy", "mean feature norm")
'''
REGISTRY_ENTRY = (
    '        Task("toy", "transfer.tasks.toy", "a toy task", "configs/transfer/toy_default.yaml", '
    'lower_is_better=("norm",)),\n'
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """The project's packages and configs, plus the toy task: its module, its registry line, its
    config."""
    root = tmp_path_factory.mktemp("toy")
    for name in ("common", "pretrain", "transfer", "slurm", "configs"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "transfer" / "tasks" / "toy.py").write_text(TOY_MODULE)
    registry = root / "transfer" / "tasks" / "__init__.py"
    text = registry.read_text()
    anchor = "    for task in (\n"  # TASKS = {task.name: task for task in (...)}
    assert anchor in text
    registry.write_text(text.replace(anchor, anchor + REGISTRY_ENTRY))
    (root / "configs" / "transfer" / "toy_default.yaml").write_text("images: 3\nsize: 32\n")
    return root


def run_in(tree: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m ARGS` in the copy (its folder comes first on sys.path, before the installed
    project)."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=tree, capture_output=True, text=True, timeout=timeout
    )


def expected_norm(seed: int) -> float:
    """The toy metric computed here, from the same random-init backbone and images."""
    images = torch.rand(
        3, 3, 32, 32, generator=torch.Generator().manual_seed(derive_seed(seed, "task.split"))
    )
    with torch.no_grad():
        features = resolve_backbone("random:resnet18", seed, "ema").model().eval()(images)
    return features.norm(dim=1).mean().item()


def test_the_toy_task_runs_through_python_m_transfer(tree):
    run_dir = tree / "runs" / "toy"
    result = run_in(
        tree,
        "transfer",
        "toy",
        "--backbone",
        "random:resnet18",
        "--config",
        "configs/transfer/toy_default.yaml",
        f"run_dir={run_dir}",
        "seed=2",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["task"] == "toy" and record["config"]["images"] == 3
    assert record["metrics"]["norm"] == pytest.approx(expected_norm(2), rel=1e-4)
    assert run_in(tree, "transfer", "toy", "--help").stdout.startswith(
        "usage: python -m transfer toy "
    )


def test_the_toy_task_runs_in_a_sweep_and_its_report_knows_its_direction(tree):
    sweep = tree / "sweep.yaml"
    sweep.write_text(
        json.dumps(
            {
                "run_root": str(tree / "sweep"),
                "backbones": ["random:resnet18"],
                "tasks": {"toy": "configs/transfer/toy_default.yaml"},
                "seeds": [0, 1],
            }
        )
    )
    result = run_in(tree, "slurm", "sweep", "--config", str(sweep))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("  DONE") == 2, result.stdout
    for seed in (0, 1):
        record = json.loads(
            (
                tree / "sweep" / "toy" / "random-resnet18" / f"seed{seed}" / "metrics.json"
            ).read_text()
        )
        assert record["metrics"]["norm"] == pytest.approx(expected_norm(seed), rel=1e-4)
    status = run_in(tree, "slurm", "status", str(tree / "sweep"))
    assert status.returncode == 0 and status.stdout.count("DONE") == 2, (
        status.stdout + status.stderr
    )
    collect = run_in(tree, "slurm", "collect", str(tree / "sweep"))
    assert collect.returncode == 0, collect.stderr
    assert "| norm (lower is better) |" in (tree / "sweep" / "report" / "report.md").read_text()


def test_the_pipeline_plans_the_toy_task_by_default_and_its_command_runs(tree):
    result = run_in(tree, "slurm", "pipeline", "--dry-run", f"root={tree / 'demo'}")
    assert result.returncode == 0, result.stderr
    lines = [
        line
        for line in result.stdout.splitlines()
        if line.startswith("[pipeline] toy/pretrained/seed0: python")
    ]
    assert len(lines) == 1, result.stdout
    command = lines[0].split(": python -m ", 1)[1].split()
    assert command[:2] == ["transfer", "toy"] and "--config" in command
    assert run_in(tree, *command, "--help").returncode == 0
    assert not (tree / "demo").exists()
