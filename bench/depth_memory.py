"""Peak memory of one depth training step at the protocol's size (FCRN on ResNet-50, 304 x 228
crops), per process, as a function of the per-process batch; extrapolated to the protocol's 64
images per GPU (batch 256 over 4 GPUs) and to the 256 of one process.

Each batch size runs in a fresh process: build the model, run one forward + backward in float32 on
the CPU, and read the peak resident set (ru_maxrss) before and after the step. The step's growth is
linear in the batch (activations kept for the backward pass); the fit's slope is the memory per
image. On a GPU the same activations take the same bytes in float32; bf16 autocast stores most of
them in half the bytes.

    python bench/depth_memory.py [--batches 2 4 8] [--write]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEP = """
import json, resource, torch
from pretrain.networks import build_resnet
from transfer.tasks.depth import FCRN, berhu_loss
torch.manual_seed(0)
model = FCRN(build_resnet("resnet50"), 2048).train()
images, depths = torch.randn({b}, 3, 228, 304), torch.rand({b}, 228, 304) * 10
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
berhu_loss(model(images)[:, 0], depths).backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"before_kib": before, "after_kib": after}}))
"""


def measure(batch: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", STEP.format(b=batch)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--write", action="store_true", help="append the result to BENCHMARKS.md")
    args = parser.parse_args()
    rows = [(b, measure(b)) for b in args.batches]
    growth = [(b, (r["after_kib"] - r["before_kib"]) / 2**20) for b, r in rows]  # GiB
    n = len(growth)
    mean_b, mean_g = sum(b for b, _ in growth) / n, sum(g for _, g in growth) / n
    slope = sum((b - mean_b) * (g - mean_g) for b, g in growth) / sum(
        (b - mean_b) ** 2 for b, _ in growth
    )
    intercept = mean_g - slope * mean_b
    lines = ["| per-process batch | step growth of the peak RSS (GiB) |", "|---|---|"]
    lines += [f"| {b} | {g:.2f} |" for b, g in growth]
    lines += [
        "",
        f"Fit: {intercept:.2f} GiB + {slope * 1024:.0f} MiB per image (float32). Extrapolated: "
        f"64 images per process (batch 256 on 4 GPUs) {intercept + 64 * slope:.1f} GiB; 256 "
        f"in one process "
        f"{intercept + 256 * slope:.1f} GiB.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write(
                "\n\n## Depth: memory of a training step at the protocol's size\n\n`python "
                "bench/depth_memory.py "
                f"--batches {' '.join(map(str, args.batches))} --write` (FCRN on ResNet-50, "
                f"304 x 228, one "
                "forward + backward on the CPU in float32; the peak resident set's growth over "
                "the step):\n\n" + text + "\n"
            )


if __name__ == "__main__":
    main()
