"""Pretraining step throughput: this project's SSL-HSIC step against lightly's BYOL step, same backbone, batch,
input size and optimizer (SGD), alternating in one run. Synthetic inputs: this measures the step, not the data.
    .venv/bin/pip install -c constraints.txt lightly==1.6.0      (the bench extra)
    .venv/bin/python bench/pretrain_step.py [--arch resnet18 --batch 64 --size 32 --rounds 5 --steps 5]
        [--precisions fp32 bf16] [--device cpu|cuda]
Each precision runs both methods: fp32, or bf16 = bf16 autocast + channels_last (the networks; the losses see
float32), as `train.cpu_amp` / `train.amp` do in the trainer.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn


def inputs(batch: int, size: int, device: str, memory_format: torch.memory_format):
    return [torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
            for _ in range(2)]


def ssl_hsic_step_fn(arch: str, batch: int, size: int, device: str, bf16: bool):
    from pretrain.ema import ema_update_
    from pretrain.hsic import SSLHSICLoss
    from pretrain.networks import OnlineNetwork
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    online = OnlineNetwork(arch, 4096, 256, 4096, use_predictor=True).to(device, memory_format=memory_format)
    target = copy.deepcopy(online.encoder).requires_grad_(False)
    loss_fn = SSLHSICLoss().to(device)
    optimizer = torch.optim.SGD(online.parameters(), lr=0.05, momentum=0.9)
    scale_optimizer = torch.optim.Adam(loss_fn.parameters(), lr=3e-4)
    x1, x2 = inputs(batch, size, device, memory_format)
    step = [0]

    def run():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            (_, _, p1), (_, _, p2) = online(x1), online(x2)
            with torch.no_grad():
                t1, t2 = target(x1)[1], target(x2)[1]
        generator = torch.Generator().manual_seed(step[0])
        loss, _ = loss_fn([p1, p2, t2, t1], [generator])
        bandwidth = loss_fn.bandwidth_loss([p1, p2, t2, t1], [generator])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scale_optimizer.zero_grad(set_to_none=True)
        bandwidth.backward()
        scale_optimizer.step()
        ema_update_(target, online.encoder, 0.99, buffers=False)
        step[0] += 1
    return run


def lightly_byol_step_fn(arch: str, batch: int, size: int, device: str, bf16: bool):
    import torchvision
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import update_momentum
    backbone = getattr(torchvision.models, arch)(weights=None)
    width = backbone.fc.in_features
    backbone.fc = nn.Identity()
    projector, predictor = BYOLProjectionHead(width, 4096, 256), BYOLPredictionHead(256, 4096, 256)
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    online = nn.ModuleDict(dict(backbone=backbone, projector=projector, predictor=predictor))
    online.to(device, memory_format=memory_format)
    target = copy.deepcopy(nn.ModuleDict(dict(backbone=backbone, projector=projector))).requires_grad_(False)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(online.parameters(), lr=0.05, momentum=0.9)
    x1, x2 = inputs(batch, size, device, memory_format)

    def run():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            p1 = online["predictor"](online["projector"](online["backbone"](x1)))
            p2 = online["predictor"](online["projector"](online["backbone"](x2)))
            with torch.no_grad():
                t1 = target["projector"](target["backbone"](x1))
                t2 = target["projector"](target["backbone"](x2))
        p1, p2, t1, t2 = (x.float() for x in (p1, p2, t1, t2))
        loss = 0.5 * (criterion(p1, t2) + criterion(p2, t1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_momentum(online["backbone"], target["backbone"], 0.99)
        update_momentum(online["projector"], target["projector"], 0.99)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    synchronize = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    steps = {}
    for precision in args.precisions:
        bf16 = precision == "bf16"
        steps[f"ssl-hsic {precision}"] = ssl_hsic_step_fn(args.arch, args.batch, args.size, args.device, bf16)
        steps[f"lightly byol {precision}"] = lightly_byol_step_fn(args.arch, args.batch, args.size, args.device, bf16)
    for run in steps.values():
        run()  # warm-up
    rates = {name: [] for name in steps}
    for _ in range(args.rounds):  # alternating, so that machine noise hits all alike
        for name, run in steps.items():
            synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            synchronize()
            rates[name].append(args.steps * args.batch / (time.perf_counter() - start))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    first = next(iter(medians.values()))
    print(f"{args.arch}, batch {args.batch}, {args.size}x{args.size}, {args.device}, {torch.get_num_threads()} threads")
    print(f"| step | images/s (median of rounds) | vs {next(iter(medians))} |\n|---|---|---|")
    for name, rate in medians.items():
        print(f"| {name} | {rate:.1f} | {rate / first:.2f} |")
    for precision in args.precisions:
        ratio = medians[f"ssl-hsic {precision}"] / medians[f"lightly byol {precision}"]
        print(f"ratio ssl-hsic / lightly byol, {precision} = {ratio:.3f}")


if __name__ == "__main__":
    main()
