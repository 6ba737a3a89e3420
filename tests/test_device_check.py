"""bench/device_check.py, the GPU device check, run small on the CPU (--device cpu --tiny) as a user
runs it: every
row that can run on a CPU runs and passes its own assertions; and --device cuda without CUDA is
refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

SCRIPT = ROOT / "bench" / "device_check.py"
CPU_ROWS = [
    "SSL-HSIC step, fp32",
    "SSL-HSIC step, bf16 + channels_last",
    "BYOL step (plain torch), fp32",
    "BYOL step (plain torch), bf16 + channels_last",
    "2 processes on one device = 1 process with 2 draws (trainer)",
    "linear (feature extraction + classifier)",
    "kNN (feature extraction)",
    "finetune",
    "classify (finetune protocol)",
    "depth",
]
NO_THROUGHPUT = {"2 processes on one device = 1 process with 2 draws (trainer)"}


def table_rows(text: str) -> dict[str, list[str]]:
    """The markdown table's rows by their first cell (the header and the rule left out)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| row |", "|---")):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def test_the_tiny_check_runs_every_cpu_row_and_writes_its_table(tmp_path):
    """Segmentation and detection are skipped here for time: tests/test_transfer_tasks.py runs both
    tasks on the
    CPU, and the check runs them on a machine where they import."""
    out = tmp_path / "device_check.md"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--tiny",
            "--skip",
            "segmentation",
            "detection",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert out.read_text() == result.stdout  # the table, and nothing else, on stdout and in --out
    rows = table_rows(out.read_text())
    assert len(rows) == 13
    for name in CPU_ROWS:
        status, images_per_s, memory, notes = rows[name]
        assert status == "ok", f"{name}: {status}"
        assert memory == "–"  # no GPU memory on a CPU
        if name not in NO_THROUGHPUT:
            assert float(images_per_s) > 0, f"{name}: images/s {images_per_s}"
    assert rows["SSL-HSIC step, bf16 + channels_last + torch.compile"][0].startswith(
        "not run: torch.compile is checked on CUDA only"
    )
    assert (
        rows["segmentation (mmsegmentation)"][0]
        == rows["detection (detectron2)"][0]
        == "not run: skipped (--skip)"
    )
    assert "loss + bandwidth objective" in rows["SSL-HSIC step, fp32"][3]
    assert "SSL-HSIC / BYOL images/s = " in rows["BYOL step (plain torch), fp32"][3]
    two = rows["2 processes on one device = 1 process with 2 draws (trainer)"][3]
    assert (
        two.startswith("backend gloo, GlobalBatchNorm in online + target")
        and "ranks bitwise equal" in two
    )


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU is visible: the refusal is for machines without one"
)
def test_cuda_without_a_gpu_is_refused_on_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "device_check.md"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"error: --device cuda but torch {torch.__version__} sees no CUDA device here; run this "
        "on a GPU machine, or pass --device cpu\n"
    )
    assert not out.exists() and list(tmp_path.iterdir()) == []
