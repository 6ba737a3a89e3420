"""How noisy the random-feature gradient is, against the number of independent draws averaged.

The SSL-HSIC loss with random Fourier features is a random estimate of the exact-kernel loss. On W
processes each one draws its own features and DDP averages the gradients (the released code's
behaviour, and this project's since `loss.draws`): a step averages W x draws estimates. This
measures, on synthetic views, the cosine between the gradient (with respect to the M views the loss
sees) of K averaged draws and the gradient of the exact estimator, and the loss's forward + backward
time for each K relative to one draw and to the exact estimator.

Views: B images with centres c_i ~ N(0, I_d); view p of image i is c_i + 0.7 n_ip (the loss
L2-normalises),
M = 4, d = 128 and D = 512 as in the small config (d = 256 in the full-size one: --dim 256).

    .venv/bin/python bench/rff_noise.py [--batch 256] [--dim 128] [--draws 1 4 16 64] [--trials 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def views(batch: int, dim: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(batch, dim, generator=generator)
    return [
        (centres + 0.7 * torch.randn(batch, dim, generator=generator)).requires_grad_(True)
        for _ in range(4)
    ]


def gradient(loss_fn, hiddens: list[torch.Tensor], generators) -> tuple[torch.Tensor, float]:
    for h in hiddens:
        h.grad = None
    start = time.perf_counter()
    loss, _ = loss_fn(hiddens, generators)
    loss.backward()
    elapsed = time.perf_counter() - start
    return torch.cat([h.grad.flatten() for h in hiddens]), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--draws", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    from pretrain.hsic import SSLHSICLoss, draw_generators

    hiddens = views(args.batch, args.dim, 0)
    exact_fn, rff_fn = SSLHSICLoss(estimator="exact"), SSLHSICLoss(num_features=512)
    exact, _ = gradient(exact_fn, hiddens, [None])
    exact_times = [gradient(exact_fn, hiddens, [None])[1] for _ in range(3)]
    one_draw_s = None
    print(f"B = {args.batch}, M = 4, d = {args.dim}, D = 512; {args.trials} trials per row")
    print(
        "| draws averaged | cosine with the exact gradient (mean ± sd) | loss F+B time / one draw "
        "| / exact |"
    )
    print("|---|---|---|---|")
    for draws in args.draws:
        cosines, times = [], []
        for trial in range(args.trials):
            grad, elapsed = gradient(rff_fn, hiddens, draw_generators(trial, 0, 0, draws))
            cosines.append(torch.nn.functional.cosine_similarity(grad, exact, dim=0).item())
            times.append(elapsed)
        median_s = statistics.median(times)
        one_draw_s = one_draw_s or median_s
        print(
            f"| {draws} | {statistics.mean(cosines):.3f} ± {statistics.stdev(cosines):.3f} | "
            f"{median_s / one_draw_s:.1f} | {median_s / statistics.median(exact_times):.2f} |"
        )


if __name__ == "__main__":
    main()
