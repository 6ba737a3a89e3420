"""Margins of the recipe that tests/test_pretrained_beats_random.py runs, over pretraining seeds.

For each seed S: the small pretraining config for half an epoch in fp32 (`data.limit=30000
optim.epochs=1 train.cpu_amp=false`, 117 steps), then the linear probe and kNN of
configs/transfer/linear_fashion_mnist.yaml on the first 1,000 training images (about 100 per class)
and all 10,000 test images, on the EMA network and on the same ResNet-18 at random init (seed S).
Few labels separate the backbones far more than all 60,000 (BENCHMARKS.md), at an eighth of the
pretraining cost.

    .venv/bin/python bench/test_recipe_margins.py [--seeds 0 1 2] [--out runs/test_recipe]
        [--pretrain key=value ...]     (pretraining overrides, e.g. loss.estimator=exact; use another --out)
        [--transfer key=value ...]     (linear / kNN overrides, e.g. data.image_size=40)

Prints one row per (task, seed) and the smallest margin per task; the test asserts about half of it.
Every run is on one thread, as in the test suite (OMP_NUM_THREADS=k runs them on k)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PRETRAIN = [
    "--config",
    "configs/pretrain/fashion_mnist_resnet18.yaml",
    "data.limit=30000",
    "optim.epochs=1",
    "train.cpu_amp=false",
]
TASK = ["--config", "configs/transfer/linear_fashion_mnist.yaml", "data.limit_train=1000"]
THREADS = os.environ.get("OMP_NUM_THREADS", "1")


def run(*args: str) -> None:
    # one thread, as in the test suite (tests/conftest.py): the margins depend on it
    subprocess.run(
        [sys.executable, "-m", *args], check=True, env={**os.environ, "OMP_NUM_THREADS": THREADS}
    )


def margins(
    seed: int, out: Path, overrides: list[str] = (), transfer: list[str] = ()
) -> dict[str, tuple[float, float]]:
    root = out / f"seed{seed}"
    run("pretrain", *PRETRAIN, f"run_dir={root / 'pretrain'}", f"seed={seed}", *overrides)
    scores = {}
    for task in ("linear", "knn"):
        for name, backbone in (
            ("pretrained", str(root / "pretrain" / "checkpoints" / "last.pt")),
            ("random", "random:resnet18"),
        ):
            run_dir = root / f"{task}_{name}"
            run(
                "transfer",
                task,
                "--backbone",
                backbone,
                *TASK,
                f"run_dir={run_dir}",
                f"seed={seed}",
                f"cache_dir={out / 'cache'}",
                *transfer,
            )
            scores[(task, name)] = json.loads((run_dir / "metrics.json").read_text())["metrics"][
                "top1"
            ]
    return {
        task: (scores[(task, "pretrained")], scores[(task, "random")]) for task in ("linear", "knn")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/test_recipe"))
    parser.add_argument(
        "--pretrain", nargs="*", default=[], metavar="key=value", help="pretraining overrides"
    )
    parser.add_argument(
        "--transfer", nargs="*", default=[], metavar="key=value", help="linear / kNN overrides"
    )
    args = parser.parse_args()
    results = {seed: margins(seed, args.out, args.pretrain, args.transfer) for seed in args.seeds}
    print("| task | seed | top-1 pretrained | top-1 random init | margin |\n|---|---|---|---|---|")
    for task in ("linear", "knn"):
        for seed, by_task in results.items():
            pretrained, random_init = by_task[task]
            print(
                f"| {task} | {seed} | {pretrained:.2f} | {random_init:.2f} | "
                f"{pretrained - random_init:+.2f} |"
            )
        print(
            f"| {task} | smallest | | | "
            f"{min(r[task][0] - r[task][1] for r in results.values()):+.2f} |"
        )


if __name__ == "__main__":
    main()
