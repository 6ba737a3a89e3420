"""Forward + backward time and peak memory of the SSL-HSIC loss, RFF against exact, for B in {256,
1024, 4096}.

M = 4 views, d = 256, D = 512 (docs/loss.md). Also the bandwidth objective's forward + backward (its 1024
sampled pairs a side, whatever B), which every training step adds to the loss. Each (estimator, B)
runs in a fresh subprocess so that its peak resident memory (ru_maxrss) can be read; time is the
median of several repetitions after a warm-up.
    .venv/bin/python bench/loss.py [--device cuda] [--batches 256 1024 4096]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def measure(estimator: str, batch: int, device: str, repeats: int) -> dict:
    import resource
    import statistics
    import time

    import torch

    from pretrain.hsic import SSLHSICLoss

    torch.manual_seed(0)
    views = [torch.randn(batch, 256, device=device, requires_grad=True) for _ in range(4)]
    loss_fn = SSLHSICLoss(num_features=512, estimator=estimator).to(device)
    generator = torch.Generator().manual_seed(0)

    def step():
        loss, _ = loss_fn(views, [generator])
        loss.backward()

    def bandwidth_step():
        loss_fn.bandwidth_loss(views, [generator]).backward()

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up
    bandwidth_step()
    median_s, bandwidth_s = timed(step), timed(bandwidth_step)
    peak_mb = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    )
    return {
        "estimator": estimator,
        "batch": batch,
        "median_s": median_s,
        "peak_mb": peak_mb,
        "bandwidth_s": bandwidth_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: estimator batch
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.device, args.repeats)))
        return
    rows = []
    for batch in args.batches:
        for estimator in ("rff", "exact"):  # alternating, in one run
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    estimator,
                    str(batch),
                    "--device",
                    args.device,
                    "--repeats",
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        "| B | RFF time (s) | exact time (s) | speed-up | RFF peak (MB) | exact peak (MB) | memory "
        "ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        rff, exact = (
            next(r for r in rows if r["batch"] == batch and r["estimator"] == e)
            for e in ("rff", "exact")
        )
        print(
            f"| {batch} | {rff['median_s']:.4f} | {exact['median_s']:.4f} | "
            f"{exact['median_s'] / rff['median_s']:.1f}x "
            f"| {rff['peak_mb']:.0f} | {exact['peak_mb']:.0f} | "
            f"{exact['peak_mb'] / max(rff['peak_mb'], 1):.1f}x |"
        )
    bandwidth = [r["bandwidth_s"] for r in rows]
    print(
        f"bandwidth objective, forward + backward: {min(bandwidth):.4f}-{max(bandwidth):.4f} s "
        f"(any B)"
    )


if __name__ == "__main__":
    main()
