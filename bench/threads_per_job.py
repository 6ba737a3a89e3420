"""What a job's second thread buys on this machine: a short run of each of the main job's heavy
steps (pretraining, segmentation, detection, depth) as `python -m ...` on one thread and on two, one
after the other (run it on an idle machine; it takes about 8 minutes on 2 cores):

    .venv/bin/python bench/threads_per_job.py [--out /tmp/threads_per_job]

Prints each step's wall time on 1 and 2 threads and their ratio. A ratio below 2 means two local
jobs on one thread each (configs/slurm/local.yaml: parallel_jobs 2, threads_per_job 1) finish a
graph sooner than one job at a time on two threads; the main job's steps scale 1.0-1.6x
(BENCHMARKS.md)."""

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands(out: Path, scenes: Path) -> dict[str, list[str]]:
    """Each step as the main job runs it (configs/pipeline/demo.yaml), shortened, on random init
    (pretraining from
    scratch): what the thread count changes is the same."""
    random = ["--backbone", "random-resnet18=random:resnet18"]
    return {
        "pretrain (6,000 images)": [
            "pretrain",
            "--config",
            "configs/pretrain/fashion_mnist_resnet18.yaml",
            "data.limit=6000",
            "optim.epochs=1",
            "seed=0",
        ],
        "segmentation (100 iterations)": [
            "transfer",
            "segmentation",
            *random,
            "--config",
            "configs/transfer/segmentation_scenes.yaml",
            "seed=0",
            f"data.root={scenes / 'voc' / 'VOC2012'}",
            "schedule.iterations=100",
        ],
        "detection (50 iterations)": [
            "transfer",
            "detection",
            *random,
            "--config",
            "configs/transfer/detection_scenes.yaml",
            "seed=0",
            f"data.train_json={scenes / 'coco' / 'annotations' / 'instances_train.json'}",
            f"data.train_images={scenes / 'coco' / 'train'}",
            f"data.test_json={scenes / 'coco' / 'annotations' / 'instances_val.json'}",
            f"data.test_images={scenes / 'coco' / 'val'}",
            "iterations=50",
        ],
        "depth (30 steps)": [
            "transfer",
            "depth",
            *random,
            "--config",
            "configs/transfer/depth_scenes.yaml",
            "seed=0",
            f"data.root={scenes / 'nyu'}",
            "steps=30",
        ],
    }


def timed(argv: list[str], run_dir: Path, threads: int) -> float:
    shutil.rmtree(run_dir, ignore_errors=True)  # a finished run dir would be skipped
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", *argv, f"run_dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    if result.returncode:
        raise SystemExit(f"{' '.join(argv[:2])} failed: {result.stderr.strip().splitlines()[-1]}")
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default="/tmp/threads_per_job", help="run dirs and the generated scenes"
    )
    args = parser.parse_args()
    out = Path(args.out)
    from transfer.scenes import write_all

    scenes = out / "scenes"
    if not (scenes / "nyu").exists():
        write_all(scenes, 200, 50, 128, 0)  # the main job's scenes (demo.yaml)
    print("step | 1 thread (s) | 2 threads (s) | ratio")
    for name, argv in commands(out, scenes).items():
        seconds = {
            threads: timed(argv, out / f"{name.split()[0]}-{threads}", threads)
            for threads in (2, 1)
        }
        print(
            f"{name} | {seconds[1]:.1f} | {seconds[2]:.1f} | {seconds[1] / seconds[2]:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
