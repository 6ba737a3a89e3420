"""Pretraining: resume exactness, distributed equivalence, LARS, EMA, augmentations, and bad
input."""

import math
import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from PIL import Image

from common.config import load_config
from common.distributed import init_distributed, shutdown_distributed
from pretrain.augment import TwoViews, eval_transform
from pretrain.data import Augmented, FashionMNIST
from pretrain.ema import target_tau
from pretrain.hsic import SSLHSICLoss
from pretrain.networks import OnlineNetwork
from pretrain.optim import LARS, parameter_groups
from pretrain.schema import AugmentConfig, PretrainConfig
from pretrain.trainer import OnlineOnBothViews, Pretrainer, TrainingDiverged, gather, train
from tests.helpers import TINY, assert_same_weights, final_state, run_cli, tiny_config

# --------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("use_target, batched", [(True, True), (False, False)])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, use_target, batched):
    """Either augmentation path; fp32 (train.cpu_amp's bf16 kernels are not bitwise
    reproducible)."""

    variant = [f"model.use_target={use_target}", f"augment.batched={batched}"]
    train(tiny_config(tmp_path / "straight", *variant))
    train(tiny_config(tmp_path / "resumed", *variant, "optim.max_steps=3"))
    assert final_state(tmp_path / "resumed")["step"] == 3
    assert not (tmp_path / "resumed" / "metrics.json").exists()  # unfinished: no final metrics
    # workers do not change the views
    train(tiny_config(tmp_path / "resumed", *variant, "data.num_workers=1"))
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert straight["step"] == resumed["step"] == 6
    assert_same_weights(straight, resumed)
    history = [line for line in (tmp_path / "resumed" / "history.jsonl").read_text().splitlines()]
    # 3: logged at the stop
    assert [OmegaConf.create(line).step for line in history] == [2, 3, 4, 6]
    metrics = OmegaConf.load(tmp_path / "resumed" / "metrics.json")
    assert metrics.task == "pretrain" and math.isfinite(metrics.metrics.loss)
    assert (tmp_path / "resumed" / "log.txt").read_text().count("resuming") == 1
    assert list((tmp_path / "resumed" / "events").iterdir())


def test_training_moves_the_loss_and_the_bandwidth(tmp_path):

    trainer = Pretrainer(tiny_config(tmp_path / "run", "optim.max_steps=1", "train.rankme_every=1"))
    trainer.run()
    online_before = {k: v.clone() for k, v in trainer.online.state_dict().items()}
    target_before = {k: v.clone() for k, v in trainer.target.state_dict().items()}
    batch = next(iter(trainer._loader(0, 1)))
    stats = trainer.train_step(*trainer._views(batch))
    assert stats["scale"] != 1.0 and stats["rankme"] > 1.0
    changed = [
        k for k, v in trainer.online.state_dict().items() if not torch.equal(v, online_before[k])
    ]
    assert any("predictor" in k for k in changed) and any("backbone" in k for k in changed)
    # The target moved by the EMA rule exactly: t' = tau t + (1 - tau) online'.
    tau = stats["tau"]
    online_encoder = {
        k[len("encoder.") :]: v
        for k, v in trainer.online.state_dict().items()
        if k.startswith("encoder.")
    }
    for key, value in trainer.target.state_dict().items():
        if key in dict(trainer.target.named_parameters()):
            expected = torch.lerp(target_before[key], online_encoder[key], 1 - tau)
            assert torch.allclose(value, expected, atol=1e-6), key
    assert all(p.grad is None for p in trainer.target.parameters())


def test_cpu_amp_trains_in_bf16_and_channels_last_where_the_cpu_has_bf16(tmp_path):

    trainer = Pretrainer(
        tiny_config(tmp_path / "run", "train.deterministic=false", "train.cpu_amp=true")
    )
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    batch = next(iter(trainer._loader(0, 0)))
    view1, view2, labels = trainer._views(batch)
    assert view1.is_contiguous(
        memory_format=torch.channels_last if native else torch.contiguous_format
    )
    hiddens, features, logits = trainer.hiddens(view1, view2)
    assert features.dtype == (torch.bfloat16 if native else torch.float32)
    stats = trainer.train_step(view1, view2, labels)
    assert math.isfinite(stats["loss"]) and stats["hsic_xy"] > 0
    # autocast, not a bf16 model
    assert all(p.dtype == torch.float32 for p in trainer.online.parameters())


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):

    trainer = Pretrainer(tiny_config(tmp_path / "run", "optim.max_steps=2"))
    trainer.run()
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    before = checkpoint.read_bytes()
    with torch.no_grad():
        trainer.online.encoder.projector[0].weight.fill_(float("nan"))
    batch = next(iter(trainer._loader(0, 2)))
    with pytest.raises(
        TrainingDiverged, match=r"NaN or inf at step 2; the last good checkpoint .* is kept"
    ):
        trainer.train_step(*trainer._views(batch))
    assert checkpoint.read_bytes() == before


# ------------------------------------------------------------------------------------ distributed


def _distributed_worker(rank, world, port, inputs, result_dir):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )

    init_distributed("gloo")
    loss, grads = _loss_and_grads(
        inputs[0].chunk(world)[rank], inputs[1].chunk(world)[rank], distributed=True
    )
    torch.save({"loss": loss, "grads": grads}, Path(result_dir) / f"rank{rank}.pt")
    shutdown_distributed()


def _loss_and_grads(view1, view2, distributed):

    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    model = OnlineOnBothViews(online)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    z1, z2, _ = model(view1, view2)  # no probe: no logits
    loss, _ = SSLHSICLoss(num_features=32)(
        [gather(z1), gather(z2)], [torch.Generator().manual_seed(3)]
    )
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in online.parameters()]


def test_two_processes_with_half_batches_match_one_process(tmp_path):
    inputs = (torch.randn(16, 12), torch.randn(16, 12))
    expected_loss, expected_grads = _loss_and_grads(*inputs, distributed=False)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distributed_worker, args=(2, port, inputs, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(result["loss"], expected_loss, atol=1e-6)
        for got, expected in zip(result["grads"], expected_grads):
            assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)


# -------------------------------------------------------------------------------- optimizer, EMA


def test_lars_follows_its_update_rule():

    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    weight.grad = torch.tensor([[0.6, 0.8]])
    lr, wd, eta, momentum = 0.5, 0.1, 0.01, 0.9
    optimizer = LARS([weight], lr=lr, momentum=momentum, weight_decay=wd, eta=eta)
    optimizer.step()
    g = [0.6 + 0.1 * 3, 0.8 + 0.1 * 4]  # grad + wd * w = [0.9, 1.2], norm 1.5
    trust = eta * 5 / 1.5
    first = [lr * trust * x for x in g]  # v1 = lr * trust * g
    assert weight.detach().tolist()[0] == pytest.approx([3 - first[0], 4 - first[1]], rel=1e-6)
    w1 = weight.detach().clone()[0].tolist()
    weight.grad = torch.tensor([[0.6, 0.8]])
    optimizer.step()
    g2 = [0.6 + wd * w1[0], 0.8 + wd * w1[1]]
    trust2 = eta * math.hypot(*w1) / math.hypot(*g2)
    v2 = [momentum * first[i] + lr * trust2 * g2[i] for i in range(2)]
    assert weight.detach().tolist()[0] == pytest.approx([w1[0] - v2[0], w1[1] - v2[1]], rel=1e-6)


def test_biases_and_norm_parameters_get_neither_decay_nor_adaptation():

    model = OnlineNetwork("resnet18", 32, 16, 32, True)
    decayed, excluded = parameter_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert (
        all(p.ndim >= 2 for p in decayed["params"])
        and decayed["adapt"]
        and decayed["weight_decay"] == 1e-4
    )
    assert {names[id(p)] for p in excluded["params"]} >= {
        "encoder.backbone.bn1.weight",
        "encoder.backbone.bn1.bias",
        "encoder.projector.0.bias",
    }
    assert not excluded["adapt"] and excluded["weight_decay"] == 0
    bias = torch.nn.Parameter(torch.tensor([2.0]))
    bias.grad = torch.tensor([0.5])
    LARS([dict(params=[bias], weight_decay=0.0, adapt=False)], lr=0.1, weight_decay=0.3).step()
    assert bias.item() == pytest.approx(2.0 - 0.1 * 0.5)  # plain SGD: no decay, no trust ratio


def test_target_tau_schedule():

    assert target_tau(0, 1000, 0.99) == pytest.approx(0.99)
    assert target_tau(500, 1000, 0.99) == pytest.approx(0.995)
    assert target_tau(1000, 1000, 0.99) == pytest.approx(1.0)


# --------------------------------------------------------------------------------- augmentations


def test_two_views_differ_and_have_the_right_size_and_range():

    config = AugmentConfig()
    image = torch.randint(
        0, 256, (3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    torch.manual_seed(0)
    view1, view2 = TwoViews(config, 24)(image)
    assert view1.shape == view2.shape == (3, 24, 24) and view1.dtype == torch.float32
    assert not torch.equal(view1, view2)
    low = min((0 - m) / s for m, s in zip(config.mean, config.std))
    high = max((1 - m) / s for m, s in zip(config.mean, config.std))
    assert low - 1e-5 <= view1.min() and view1.max() <= high + 1e-5
    transform = eval_transform(24, config.mean, config.std)
    torch.manual_seed(1)
    first = transform(image)
    torch.manual_seed(2)
    assert torch.equal(first, transform(image)) and first.shape == (3, 24, 24)


def test_views_depend_only_on_seed_epoch_and_index():

    data = Augmented(
        FashionMNIST("/usr/share/datasets/fashion-mnist", limit=4), TwoViews(AugmentConfig(), 16), 0
    )
    a = data[(2, 0)][0][0]
    torch.manual_seed(123)
    assert torch.equal(a, data[(2, 0)][0][0]) and not torch.equal(a, data[(2, 1)][0][0])


# ------------------------------------------------------------------------------------- bad input


def cli(tmp_path, *overrides):
    args = [
        "pretrain",
        "--config",
        "configs/pretrain/fashion_mnist_resnet18.yaml",
        f"run_dir={tmp_path / 'run'}",
        *TINY,
        *overrides,
    ]
    return run_cli(*args)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.root=/nonexistent"],
            "Fashion-MNIST not found in /nonexistent .* dataset-fashion-mnist",
        ),
        (
            ["model.backbone=resnet19"],
            "config key 'model.backbone' is 'resnet19'; it must be one of resnet18, resnet34, "
            "resnet50",
        ),
        (["data.limit=8"], "fewer than one batch of 16"),
        (
            ["data.dataset=imagefolder", "data.root=/nonexistent"],
            "image folder /nonexistent/train does not exist",
        ),
        (
            ["train.cpu_amp=true"],
            "train.deterministic=true and train.cpu_amp=true exclude each other",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_no_run_dir(tmp_path, overrides, message):
    result = cli(tmp_path, *overrides)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")

    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "run").exists()


def test_empty_image_folder_is_refused(tmp_path):
    (tmp_path / "images" / "train" / "cat").mkdir(parents=True)
    result = cli(tmp_path, "data.dataset=imagefolder", f"data.root={tmp_path / 'images'}")
    assert result.returncode == 2 and "holds no images" in result.stderr


def test_run_dir_of_another_config_is_refused_untouched(tmp_path):

    train(tiny_config(tmp_path / "run", "optim.max_steps=1"))
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    result = cli(tmp_path, "optim.base_lr=0.5")
    assert result.returncode == 2
    assert "holds a run of another config (differs at optim.base_lr)" in result.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_corrupt_image_is_named_or_skipped(tmp_path):

    root = tmp_path / "images" / "train"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (20, 20), (i * 20, 0, 0)).save(root / label / f"{i}.png")
    (root / "a" / "3.png").write_bytes(b"not a png")
    args = ("data.dataset=imagefolder", f"data.root={tmp_path / 'images'}", "optim.epochs=1")
    result = cli(tmp_path, *args)
    assert result.returncode == 2 and f"cannot read image {root / 'a' / '3.png'}" in result.stderr
    assert "data.on_corrupt=skip" in result.stderr
    metrics_args = [f"run_dir={tmp_path / 'skip'}", *args, "data.on_corrupt=skip"]
    train(
        load_config(
            PretrainConfig, "configs/pretrain/fashion_mnist_resnet18.yaml", [*TINY, *metrics_args]
        )
    )
    assert OmegaConf.load(tmp_path / "skip" / "metrics.json").skipped_images == 1
