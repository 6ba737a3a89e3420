"""Pretraining cost against dataset size and batch size on this CPU: one epoch of the small config's
recipe (`python -m pretrain`, the real data pipeline) per row, wall time measured around the whole
command.

    .venv/bin/python bench/scaling.py [--config configs/pretrain/fashion_mnist_resnet18.yaml]
        [--sizes 5120 20480] [--batches 64 128 256 512] [--reference-batch 256]

Rows: every size at the reference batch, then every batch at the largest size. A fit of
wall = startup + images / rate over the reference-batch rows gives the cost model printed at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_epoch(config: str, size: int, batch: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        command = [
            sys.executable,
            "-m",
            "pretrain",
            "--config",
            config,
            f"run_dir={run_dir}",
            f"data.limit={size}",
            f"optim.batch_size={batch}",
            "optim.epochs=1",
            "train.rankme_every=0",
            "train.log_every=1",
            "train.checkpoint_every=1000000",
            *extra,
        ]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        history = [
            json.loads(line) for line in (Path(run_dir) / "history.jsonl").read_text().splitlines()
        ]
    steps = size // batch
    # past the first steps' warm-up
    steady = [row["images_per_s"] for row in history[len(history) // 4 :]]
    return {
        "size": size,
        "batch": batch,
        "steps": steps,
        "wall": wall,
        "steady": sorted(steady)[len(steady) // 2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pretrain/fashion_mnist_resnet18.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5120, 20480])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--reference-batch", type=int, default=256)
    parser.add_argument("overrides", nargs="*", help="key=value for the config")
    args = parser.parse_args()
    largest = max(args.sizes)
    plan = [(size, args.reference_batch) for size in args.sizes]
    plan += [(largest, batch) for batch in args.batches if batch != args.reference_batch]
    rows = [one_epoch(args.config, size, batch, args.overrides) for size, batch in plan]
    print(
        "| images | batch | steps | wall time (s) | images/s, whole command | images/s, steady "
        "steps |"
    )
    print("|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["batch"], r["size"])):
        print(
            f"| {row['size']} | {row['batch']} | {row['steps']} | {row['wall']:.1f} | "
            f"{row['size'] / row['wall']:.0f} | {row['steady']:.0f} |"
        )
    reference = sorted(
        (r for r in rows if r["batch"] == args.reference_batch), key=lambda r: r["size"]
    )
    if len(reference) >= 2:
        small, large = reference[0], reference[-1]
        rate = (large["size"] - small["size"]) / (large["wall"] - small["wall"])
        startup = small["wall"] - small["size"] / rate
        print(
            f"cost model at batch {args.reference_batch}: wall ~ {startup:.1f} s + images / "
            f"{rate:.0f} per s "
            f"(one epoch of 60k: {startup + 60000 / rate:.0f} s; of ImageNet's 1.28M: "
            f"{(startup + 1.281e6 / rate) / 3600:.1f} h at this input size)"
        )


if __name__ == "__main__":
    main()
