"""The report: table values from fixture metrics.json files, and its plot files."""
import json
import statistics

import pytest

from tests.conftest import run_cli


def write_run(path, task, metrics, random, seed, dataset="scenes"):
    path.mkdir(parents=True)
    backbone = {"path": "random:resnet18", "sha256": "0" * 64, "weights": "random"} if random else \
        {"path": "/runs/fm/checkpoints/last.pt", "sha256": "1" * 64, "weights": "ema"}
    (path / "metrics.json").write_text(json.dumps({
        "task": task, "dataset": dataset, "backbone": backbone, "protocol": "p", "metrics": metrics, "seed": seed,
        "config": {}, "code_version": "0", "wall_time_s": 1.0}))
    return path


@pytest.fixture
def runs(tmp_path):
    dirs = []
    for seed, (pre, rand) in enumerate([(70.0, 60.0), (72.0, 61.0), (74.0, 65.0)]):
        dirs.append(write_run(tmp_path / f"seg_pre{seed}", "segmentation", {"mIoU": pre}, False, seed))
        dirs.append(write_run(tmp_path / f"seg_rand{seed}", "segmentation", {"mIoU": rand}, True, seed))
    dirs.append(write_run(tmp_path / "depth_pre", "depth", {"rms": 0.5, "delta1": 80.0}, False, 0))
    dirs.append(write_run(tmp_path / "depth_rand", "depth", {"rms": 0.7, "delta1": 70.0}, True, 0))
    pretrain = write_run(tmp_path / "pretrain", "pretrain", {"loss": -0.3}, False, 0, "fashion_mnist")
    (pretrain / "history.jsonl").write_text("".join(json.dumps({"step": s, "loss": -s / 10, "hsic_xy": s / 5,
                                                                "hsic_xx": 0.01, "scale": 1.0, "rankme": 10.0 + s})
                                                    + "\n" for s in range(1, 6)))
    return [*dirs, pretrain]


def test_report_table_values(runs, tmp_path):
    from transfer.report import build_report
    report = build_report(runs, tmp_path / "out", plots=False, echo=False)
    rows = {(r["task"], r["metric"]): r for r in report["rows"]}
    seg = rows[("segmentation", "mIoU")]
    assert seg["pretrained"] == pytest.approx((72.0, statistics.stdev([70, 72, 74]), 3))
    assert seg["random init"] == pytest.approx((62.0, statistics.stdev([60, 61, 65]), 3))
    assert seg["difference"] == pytest.approx(10.0)
    assert rows[("depth", "rms")]["difference"] == pytest.approx(-0.2)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| segmentation | scenes | mIoU | 72 ± 2 (n=3) | 62 ± 2.6 (n=3) | +10 |" in md
    assert "| depth | scenes | rms (lower is better) | 0.5 | 0.7 | -0.2 |" in md
    csv = (tmp_path / "out" / "report.csv").read_text().splitlines()
    assert "segmentation,scenes,mIoU,72.0,2.0,3,62.0,2.6457513110645907,3,10.0" in csv


def test_report_cli_writes_plots(runs, tmp_path):
    result = run_cli("transfer", "report", *map(str, runs), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "| segmentation |" in result.stdout
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["pretrain_pretrain.png", "task_depth.png", "task_segmentation.png"]
    assert all((tmp_path / "out" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_report_refuses_unfinished_runs(tmp_path):
    (tmp_path / "run").mkdir()
    result = run_cli("transfer", "report", str(tmp_path / "run"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "metrics.json does not exist" in result.stderr
