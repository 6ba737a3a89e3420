"""The depth task's training step with the up-projection decoder as Laina et al. draw it (unpool,
then 5x5 convs on the zero-filled map) against its fast form (transfer.tasks.depth.unpooled_conv: a
transposed convolution of the map itself), interleaved in one run so that the ratio is robust to a
noisy machine:

    .venv/bin/python bench/depth_decoder.py [--size 128] [--batch 8] [--arch resnet18] [--repeats 5]

Prints the seconds per step of each form, their ratio and the largest difference of the outputs."""

import argparse
import time

import torch
import torch.nn.functional as F

from pretrain.networks import build_resnet, feature_width
from transfer.tasks import depth


def reference_forward(block: depth.UpProjection, x: torch.Tensor) -> torch.Tensor:
    x = depth.unpool(x)
    return F.relu(block.main(x) + block.shortcut(x))


def step(model: depth.FCRN, images: torch.Tensor) -> float:
    started = time.perf_counter()
    model.zero_grad(set_to_none=True)
    model(images).square().mean().backward()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = depth.FCRN(build_resnet(args.arch), feature_width(args.arch)).train()
    images = torch.randn(args.batch, 3, args.size, args.size)
    fast_forward = depth.UpProjection.forward
    forms = {"fast": fast_forward, "unpool + 5x5 conv": reference_forward}
    times = {name: [] for name in forms}
    outputs = {}
    with torch.no_grad():  # before any step: the same weights and running statistics for both forms
        for name, forward in forms.items():
            depth.UpProjection.forward = forward
            outputs[name] = model.eval()(images[:2])
    model.train()
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, forward in forms.items():
            depth.UpProjection.forward = forward
            seconds = step(model, images)
            if repeat:
                times[name].append(seconds)
    depth.UpProjection.forward = fast_forward
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    print(
        f"{args.arch}, batch {args.batch} at {args.size} px, {torch.get_num_threads()} threads, "
        f"median of "
        f"{args.repeats} training steps:"
    )
    for name, seconds in median.items():
        print(f"  {name}: {seconds:.3f} s")
    print(
        f"  ratio: {median['unpool + 5x5 conv'] / median['fast']:.2f}x; largest output difference "
        f"{(outputs['fast'] - outputs['unpool + 5x5 conv']).abs().max().item():.2e}"
    )


if __name__ == "__main__":
    main()
