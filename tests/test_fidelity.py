"""The training loop as the official code runs it: per-rank random draws averaged over processes,
BatchNorm over the global batch, zero-initialised residual branches, BYOL's schedule edges, the
zero-debiased evaluation
EMA and the online probe. Multi-process cases run real processes (torch.distributed on gloo)."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from common.distributed import shutdown_distributed
from common.errors import UserError
from common.schedule import warmup_cosine
from pretrain.ema import debiased_ema_update_, debiased_weight
from pretrain.hsic import SSLHSICLoss, draw_generators
from pretrain.networks import build_resnet
from pretrain.schema import ModelConfig
from pretrain.sync_batchnorm import convert_sync_batchnorm
from pretrain.trainer import Pretrainer, draws_per_rank, train
from tests.helpers import ROOT, TINY, final_state, tiny_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)  # two processes on a 2-core machine


def largest_relative_difference(a: dict, b: dict) -> tuple[float, str]:
    """max over tensors of max |a - b| / max |a| (floating-point entries)."""
    return max(
        (
            (a[k].float() - b[k].float()).abs().max().item()
            / (a[k].float().abs().max().item() + 1e-12),
            k,
        )
        for k in a
        if a[k].is_floating_point()
    )


# ---------------------------------------------------------------------- draws and processes


def _pretrain_worker(rank, world, port, run_dir, out_dir, *overrides):
    join_group(rank, world, port)

    trainer = Pretrainer(tiny_config(run_dir, *overrides))
    trainer.run()
    torch.save(
        {"scale": trainer.loss_fn.scale.detach().clone(), "online": trainer.online.state_dict()},
        Path(out_dir) / f"rank{rank}.pt",
    )
    shutdown_distributed()


def test_two_processes_follow_one_process_with_two_draws(tmp_path):
    """6 steps of the tiny run with loss.total_draws=2: 2 processes (one draw each, gradients
    averaged, BatchNorm
    over both halves) end where 1 process (two draws) ends, to float tolerance; with one draw it
    ends far away."""

    (tmp_path / "ranks").mkdir()
    mp.spawn(
        _pretrain_worker,
        args=(2, free_port(), str(tmp_path / "two"), str(tmp_path / "ranks"), "loss.total_draws=2"),
        nprocs=2,
    )
    train(tiny_config(tmp_path / "draws2", "loss.total_draws=2"))
    train(tiny_config(tmp_path / "draws1", "loss.draws=1"))
    two, draws2, draws1 = (final_state(tmp_path / name) for name in ("two", "draws2", "draws1"))
    for part in ("online", "target", "ema"):
        difference, key = largest_relative_difference(draws2[part], two[part])
        assert difference < 1e-3, f"{part}.{key} differs by {difference:.2e}"
    # the test can tell them apart
    assert largest_relative_difference(draws1["online"], two["online"])[0] > 0.1
    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["scale"], ranks[1]["scale"])  # one bandwidth on every rank
    assert ranks[0]["scale"].item() == pytest.approx(draws2["loss"]["scale"].item(), abs=1e-6)
    assert all(
        torch.equal(ranks[0]["online"][k], ranks[1]["online"][k]) for k in ranks[0]["online"]
    )


@pytest.mark.parametrize(
    "total, world, per_rank", [(0, 4, 3), (128, 32, 4), (128, 128, 1), (2, 1, 2)]
)
def test_total_draws_are_shared_among_the_processes(total, world, per_rank):

    assert draws_per_rank(OmegaConf.create({"draws": 3, "total_draws": total}), world) == per_rank


def test_total_draws_that_do_not_divide_among_the_processes_are_refused_on_one_line():

    with pytest.raises(
        UserError,
        match=r"^loss.total_draws=6 does not divide among the 4 processes; choose a "
        r"multiple of 4 \(or 0 to use loss.draws per process\)$",
    ):
        draws_per_rank(OmegaConf.create({"draws": 1, "total_draws": 6}), 4)


def test_the_loss_of_several_draws_is_the_mean_of_each_draws_loss():

    hiddens = [
        torch.nn.functional.normalize(
            torch.randn(12, 8, generator=torch.Generator().manual_seed(i)), dim=1
        )
        for i in range(4)
    ]
    loss_fn = SSLHSICLoss(num_features=64)
    singles = [loss_fn(hiddens, draw_generators(5, 3, k, 1))[0] for k in range(3)]
    mean, _ = loss_fn(hiddens, draw_generators(5, 3, 0, 3))
    assert mean.item() == pytest.approx(sum(s.item() for s in singles) / 3, rel=1e-6)
    bandwidth = [
        loss_fn.bandwidth_loss(hiddens, draw_generators(5, 3, k, 1)).item() for k in range(3)
    ]
    assert loss_fn.bandwidth_loss(hiddens, draw_generators(5, 3, 0, 3)).item() == pytest.approx(
        sum(bandwidth) / 3
    )
    assert len({round(s.item(), 6) for s in singles}) == 3  # each draw its own features
    with pytest.raises(ValueError, match="at least one generator"):
        loss_fn(hiddens, [])


def _batchnorm_worker(rank, world, port, inputs, out_dir):
    join_group(rank, world, port)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )

    norm = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), torch.device("cpu"))
    with torch.no_grad():
        norm[0].weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = inputs.chunk(world)[rank].clone().requires_grad_(True)
    out = norm(x)
    (out * torch.arange(out.numel()).view_as(out)[:, :, :, :] / out.numel()).sum().backward()
    torch.save(
        {
            "out": out.detach(),
            "x_grad": x.grad,
            "w_grad": norm[0].weight.grad,
            "state": norm[0].state_dict(),
            "kind": type(norm[0]).__name__,
        },
        Path(out_dir) / f"rank{rank}.pt",
    )
    shutdown_distributed()


def test_global_batchnorm_on_two_processes_equals_batchnorm_on_the_whole_batch(tmp_path):
    inputs = torch.randn(8, 3, 4, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    mp.spawn(_batchnorm_worker, args=(2, free_port(), inputs, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["kind"] == "GlobalBatchNorm"
    reference = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = inputs.clone().requires_grad_(True)
    out = reference(x)
    # each rank weighted its own slice by the positions within that slice
    weights = torch.cat([torch.arange(4 * 3 * 4 * 5).view(4, 3, 4, 5) / (4 * 3 * 4 * 5)] * 2)
    (out * weights).sum().backward()
    torch.testing.assert_close(
        torch.cat([r["out"] for r in ranks]), out.detach(), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad, atol=1e-5, rtol=0)
    # DDP would average the two ranks' weight gradients; their sum is the whole batch's gradient
    torch.testing.assert_close(
        ranks[0]["w_grad"] + ranks[1]["w_grad"], reference.weight.grad, atol=1e-5, rtol=0
    )
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(
            ranks[0]["state"][key], reference.state_dict()[key], atol=1e-5, rtol=0
        )
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key])


def test_a_world_size_that_does_not_divide_the_global_batch_is_refused_before_anything_is_written(
    tmp_path,
):
    env = {
        "RANK": "0",
        "WORLD_SIZE": "3",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain",
            "--config",
            "configs/pretrain/fashion_mnist_resnet18.yaml",
            f"run_dir={tmp_path / 'out'}",
            *TINY,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert result.returncode == 2
    assert result.stderr == (
        "error: optim.batch_size=16 (the global batch) does not divide among the 3 processes; "
        "choose a multiple of 3\n"
    )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- network init


@pytest.mark.parametrize("arch, last_norm", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_makes_every_block_start_as_the_identity(arch, last_norm):

    zero, default = build_resnet(arch, zero_init_residual=True), build_resnet(arch)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for block_zero, block_default in zip(getattr(zero, stage), getattr(default, stage)):
            assert torch.count_nonzero(getattr(block_zero, last_norm).weight) == 0
            assert (getattr(block_default, last_norm).weight == 1).all()
    block = zero.layer1[1].eval()  # no downsample: out = relu(0 * branch + x) = relu(x)
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    assert torch.equal(block(x), torch.relu(x))


def test_the_pretraining_network_follows_model_zero_init_residual(tmp_path):

    assert ModelConfig().zero_init_residual  # the official network's init is the default
    on = Pretrainer(
        tiny_config(tmp_path / "on", "model.zero_init_residual=true")
    ).online.encoder.backbone
    off = Pretrainer(
        tiny_config(tmp_path / "off", "model.zero_init_residual=false")
    ).online.encoder.backbone
    assert (
        torch.count_nonzero(on.layer3[0].bn2.weight) == 0 and (off.layer3[0].bn2.weight == 1).all()
    )


# ---------------------------------------------------------------------------- schedules, EMA


def test_learning_rate_is_zero_at_step_zero_then_linear_then_cosine():

    assert warmup_cosine(0, 100, 10, 2.0) == 0.0
    assert warmup_cosine(5, 100, 10, 2.0) == pytest.approx(1.0)  # 2.0 * 5 / 10
    # the peak, where the cosine starts
    assert warmup_cosine(10, 100, 10, 2.0) == pytest.approx(2.0)
    assert warmup_cosine(55, 100, 10, 2.0) == pytest.approx(1.0)  # half way through the cosine
    assert warmup_cosine(40, 100, 10, 2.0) == pytest.approx(1.0 * (1 + math.cos(math.pi * 30 / 90)))
    assert warmup_cosine(100, 100, 10, 2.0) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(3, 100, 0, 2.0) == pytest.approx(1.0 * (1 + math.cos(math.pi * 3 / 100)))


def test_step_counts_are_epochs_times_images_floor_divided_by_the_batch(tmp_path):
    """56 images, batch 16, 3 epochs: int(3 * 56 // 16) = 10 steps (not 3 * 3 = 9), warmup int(0.5 *
    56 // 16) = 1;
    the run goes one step into a fourth pass over the data."""

    trainer = Pretrainer(
        tiny_config(
            tmp_path / "run",
            "data.limit=56",
            "optim.epochs=3",
            "optim.warmup_epochs=0.5",
            "train.log_every=1",
        )
    )
    assert (trainer.total_steps, trainer.warmup_steps, trainer.steps_per_epoch) == (10, 1, 3)
    trainer.run()
    history = [
        json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    ]
    assert [h["step"] for h in history] == list(range(1, 11)) and history[-1]["epoch"] == 3
    assert history[0]["lr"] == 0.0 and (tmp_path / "run" / "metrics.json").exists()


def test_the_debiased_ema_weights_equal_the_zero_debiased_average():
    """h_t = d h_{t-1} + (1 - d) x_t from h_0 = 0, average = h_t / (1 - d^t), against the lerp
    form."""

    decay, values = 0.9, [torch.tensor([float(v)]) for v in (4.0, -2.0, 7.0, 1.0, 3.0)]
    average, source = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    hidden = 0.0
    for t, value in enumerate(values, start=1):
        hidden = decay * hidden + (1 - decay) * value.item()
        with torch.no_grad():
            source.weight.fill_(value.item())
        debiased_ema_update_(average, source, decay, t)
        assert average.weight.item() == pytest.approx(hidden / (1 - decay**t), rel=1e-6)
    assert debiased_weight(1, 0.999) == 1.0 and debiased_weight(10**6, 0.999) == pytest.approx(
        0.001
    )


def test_the_exported_ema_is_debiased_and_carries_the_online_batchnorm_statistics(tmp_path):

    trainer = Pretrainer(tiny_config(tmp_path / "run", "optim.max_steps=1", "ema.eval_tau=0.9"))
    initial = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    trainer.run()  # one step: the second update of an EMA whose first was the initial network
    weight = 0.1 / (1 - 0.9**2)
    online, ema = trainer.online.state_dict(), trainer.ema.state_dict()
    parameters = dict(trainer.online.named_parameters())
    for key, value in ema.items():
        if key in parameters:
            torch.testing.assert_close(
                value, torch.lerp(initial[key], online[key], weight), atol=1e-6, rtol=1e-6
            )
        else:  # BatchNorm statistics: the online network's own
            assert torch.equal(value, online[key]), key


# -------------------------------------------------------------------------------- online probe


def test_the_online_probe_learns_alongside_and_never_changes_the_backbone(tmp_path):

    train(tiny_config(tmp_path / "probe"))
    train(tiny_config(tmp_path / "none", "model.online_probe=false"))
    probe, none = final_state(tmp_path / "probe"), final_state(tmp_path / "none")
    assert {k for k in probe["online"] if k.startswith("probe.")} == {"probe.weight", "probe.bias"}
    assert not any(k.startswith("probe.") for k in none["online"])
    # bitwise: the probe's loss reaches nothing but the probe
    for key, value in none["online"].items():
        assert torch.equal(value, probe["online"][key]), key
    for key, value in none["target"].items():
        assert torch.equal(value, probe["target"][key]), key
    history = [
        json.loads(line) for line in (tmp_path / "probe" / "history.jsonl").read_text().splitlines()
    ]
    assert all(0 <= h["probe_top1"] <= 1 and math.isfinite(h["probe_loss"]) for h in history)
    events = list((tmp_path / "probe" / "events").iterdir())
    assert events and any(b"pretrain/probe_top1" in e.read_bytes() for e in events)
    assert "probe_top1" in json.loads((tmp_path / "probe" / "metrics.json").read_text())["metrics"]


def test_the_probe_trains_with_the_backbones_optimizer_and_its_gradient_stays_out_of_the_backbone(
    tmp_path,
):

    trainer = Pretrainer(tiny_config(tmp_path / "run"))
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(trainer.online.probe.weight), id(trainer.online.probe.bias)} <= optimised
    view1, view2, labels = trainer._views(next(iter(trainer._loader(0, 0))))
    _, _, logits = trainer.forward_views(view1, view2)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert trainer.online.probe.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in trainer.online.encoder.parameters())
