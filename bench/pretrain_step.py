"""Pretraining step throughput: this project's SSL-HSIC step against BYOL's, same backbone, batch,
input size and optimizer (SGD), alternating in one run. Synthetic inputs: this measures the step,
not the data.
    .venv/bin/pip install -c constraints.txt lightly==1.6.0      (the bench extra; --byol plain needs no lightly)
    .venv/bin/python bench/pretrain_step.py [--arch resnet18 --batch 64 --size 32 --rounds 5 --steps 5]
        [--precisions fp32 bf16] [--device cpu|cuda] [--byol lightly|plain]
Each precision runs both methods: fp32, or bf16 = bf16 autocast + channels_last (the networks; the losses see
float32), as `train.cpu_amp` / `train.amp` do in the trainer. BYOL is lightly's (its heads, loss and
momentum update) or, with --byol plain, the same step in plain torch (this project's heads and EMA,
a negative-cosine loss): what bench/device_check.py runs on a GPU, where lightly is not installed.

The step builders return a `Step`: `run()` trains one step (both views through the online network in
one module call, as the trainer's OnlineOnBothViews; the target network without gradient; the loss;
SGD; the target's EMA), and `loss_part()` repeats the loss's own forward and backward (SSL-HSIC:
with the bandwidth objective) on the last step's features, so that its share of a step can be timed
apart."""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class Step:
    # one training step; returns its loss (a detached tensor: no device sync)
    run: Callable[[], Tensor]
    # the loss's forward + backward alone, on the last step's features
    loss_part: Callable[[], None]
    parameters: list[Tensor]  # the trained parameters (to check that a step changes them)


def inputs(batch: int, size: int, device: str, memory_format: torch.memory_format):
    return [
        torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
        for _ in range(2)
    ]


def _networks(arch: str, heads: tuple[int, int, int], device: str, bf16: bool, compile: bool):
    """The online network (backbone, projector, predictor), its target encoder (EMA, no gradient),
    the module that runs both views through the online network (OnlineOnBothViews, compiled when
    asked, as train.compile does) and the
    memory format of the inputs."""
    from pretrain.networks import OnlineNetwork
    from pretrain.trainer import OnlineOnBothViews

    projector_hidden, embedding, predictor_hidden = heads
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    online = OnlineNetwork(arch, projector_hidden, embedding, predictor_hidden, use_predictor=True)
    online = online.to(device, memory_format=memory_format)
    target = copy.deepcopy(online.encoder).requires_grad_(False)
    views = OnlineOnBothViews(online)
    return online, target, torch.compile(views) if compile else views, memory_format


def ssl_hsic_step(
    arch: str,
    batch: int,
    size: int,
    device: str,
    bf16: bool,
    compile: bool = False,
    heads: tuple[int, int, int] = (4096, 256, 4096),
    num_features: int = 512,
) -> Step:
    """The trainer's SSL-HSIC step (pretrain.trainer.Pretrainer.train_step) with SGD instead of LARS
    and no probe:
    loss over [p1, p2, t2, t1], one random-feature draw, the bandwidth stepped by its own Adam, EMA
    target."""
    from pretrain.ema import ema_update_
    from pretrain.hsic import SSLHSICLoss, draw_generators

    online, target, views, memory_format = _networks(arch, heads, device, bf16, compile)
    loss_fn = SSLHSICLoss(num_features=num_features).to(device)
    optimizer = torch.optim.SGD(online.parameters(), lr=0.05, momentum=0.9)
    scale_optimizer = torch.optim.Adam(loss_fn.parameters(), lr=3e-4)
    x1, x2 = inputs(batch, size, device, memory_format)
    state = {"step": 0, "hiddens": None}

    def run() -> Tensor:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            (_, _, p1), (_, _, p2), _ = views(x1, x2)
            with torch.no_grad():
                t1, t2 = target(x1)[1], target(x2)[1]
        hiddens = [p1, p2, t2, t1]
        generators = draw_generators(0, state["step"], 0, 1)
        loss, _ = loss_fn(hiddens, generators)
        bandwidth = loss_fn.bandwidth_loss(hiddens, generators)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scale_optimizer.zero_grad(set_to_none=True)
        bandwidth.backward()
        scale_optimizer.step()
        ema_update_(target, online.encoder, 0.99, buffers=False)
        state["hiddens"] = [h.detach() for h in hiddens]
        state["step"] += 1
        return loss.detach()

    def loss_part() -> None:
        hiddens = [h.clone().requires_grad_(True) for h in state["hiddens"]]
        generators = draw_generators(0, state["step"], 0, 1)
        loss, _ = loss_fn(hiddens, generators)
        bandwidth = loss_fn.bandwidth_loss(hiddens, generators)
        loss.backward()
        bandwidth.backward()
        loss_fn.scale.grad = None

    return Step(run, loss_part, list(online.parameters()))


def negative_cosine(x: Tensor, y: Tensor) -> Tensor:
    """lightly's NegativeCosineSimilarity: -mean cosine similarity of the rows."""
    return -nn.functional.cosine_similarity(x, y, dim=1).mean()


def byol_step(
    arch: str,
    batch: int,
    size: int,
    device: str,
    bf16: bool,
    compile: bool = False,
    heads: tuple[int, int, int] = (4096, 256, 4096),
) -> Step:
    """BYOL's step written as the SSL-HSIC step above, in plain torch (lightly's BYOL without
    lightly): the same
    networks and heads, loss 0.5 (-cos(p1, t2) - cos(p2, t1)) in float32, SGD, EMA target
    (parameters only)."""
    from pretrain.ema import ema_update_

    online, target, views, memory_format = _networks(arch, heads, device, bf16, compile)
    optimizer = torch.optim.SGD(online.parameters(), lr=0.05, momentum=0.9)
    x1, x2 = inputs(batch, size, device, memory_format)
    state = {"hiddens": None}

    def loss_of(p1, p2, t1, t2) -> Tensor:
        p1, p2, t1, t2 = (x.float() for x in (p1, p2, t1, t2))
        return 0.5 * (negative_cosine(p1, t2) + negative_cosine(p2, t1))

    def run() -> Tensor:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            (_, _, p1), (_, _, p2), _ = views(x1, x2)
            with torch.no_grad():
                t1, t2 = target(x1)[1], target(x2)[1]
        loss = loss_of(p1, p2, t1, t2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update_(target, online.encoder, 0.99, buffers=False)
        state["hiddens"] = [h.detach() for h in (p1, p2, t1, t2)]
        return loss.detach()

    def loss_part() -> None:
        p1, p2, t1, t2 = (h.clone().requires_grad_(i < 2) for i, h in enumerate(state["hiddens"]))
        loss_of(p1, p2, t1, t2).backward()

    return Step(run, loss_part, list(online.parameters()))


def lightly_byol_step(
    arch: str,
    batch: int,
    size: int,
    device: str,
    bf16: bool,
    compile: bool = False,
    heads: tuple[int, int, int] = (4096, 256, 4096),
) -> Step:
    """lightly's BYOL: its projection / prediction heads, NegativeCosineSimilarity and
    update_momentum."""
    import torchvision
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import update_momentum

    projector_hidden, embedding, predictor_hidden = heads
    backbone = getattr(torchvision.models, arch)(weights=None)
    width = backbone.fc.in_features
    backbone.fc = nn.Identity()
    projector = BYOLProjectionHead(width, projector_hidden, embedding)
    predictor = BYOLPredictionHead(embedding, predictor_hidden, embedding)
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    online = nn.ModuleDict(dict(backbone=backbone, projector=projector, predictor=predictor))
    online.to(device, memory_format=memory_format)
    target = copy.deepcopy(
        nn.ModuleDict(dict(backbone=backbone, projector=projector))
    ).requires_grad_(False)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(online.parameters(), lr=0.05, momentum=0.9)
    x1, x2 = inputs(batch, size, device, memory_format)
    state = {"hiddens": None}

    def run() -> Tensor:
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
        state["hiddens"] = [h.detach() for h in (p1, p2, t1, t2)]
        return loss.detach()

    def loss_part() -> None:
        p1, p2, t1, t2 = (h.clone().requires_grad_(i < 2) for i, h in enumerate(state["hiddens"]))
        (0.5 * (criterion(p1, t2) + criterion(p2, t1))).backward()

    return Step(run, loss_part, list(online.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--byol",
        default="lightly",
        choices=["lightly", "plain"],
        help="lightly's BYOL (needs lightly), or the same step in plain torch",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    synchronize = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    byol_name, byol_builder = (
        ("lightly byol", lightly_byol_step) if args.byol == "lightly" else ("byol", byol_step)
    )
    steps = {}
    for precision in args.precisions:
        bf16 = precision == "bf16"
        steps[f"ssl-hsic {precision}"] = ssl_hsic_step(
            args.arch, args.batch, args.size, args.device, bf16
        ).run
        steps[f"{byol_name} {precision}"] = byol_builder(
            args.arch, args.batch, args.size, args.device, bf16
        ).run
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
    print(
        f"{args.arch}, batch {args.batch}, {args.size}x{args.size}, {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"| step | images/s (median of rounds) | vs {next(iter(medians))} |\n|---|---|---|")
    for name, rate in medians.items():
        print(f"| {name} | {rate:.1f} | {rate / first:.2f} |")
    for precision in args.precisions:
        ratio = medians[f"ssl-hsic {precision}"] / medians[f"{byol_name} {precision}"]
        print(f"ratio ssl-hsic / {byol_name}, {precision} = {ratio:.3f}")


if __name__ == "__main__":
    main()
