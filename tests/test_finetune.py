"""Fine-tuning with few labels (the finetune task): exact resume after a kill, the selection, the
split files, the
loss and schedule by formula, and bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.config import load_config
from common.errors import UserError
from common.schedule import cosine_schedule
from pretrain.data import FashionMNIST
from tests.helpers import ROOT
from transfer.backbone import resolve_backbone
from transfer.finetuner import (
    Candidate,
    FinetuneProtocol,
    Finetuner,
    Images,
    bn_momentum,
    classification_loss,
    grid,
)
from transfer.logistic import top1
from transfer.runner import run_task
from transfer.tasks import finetune

CONFIG = str(ROOT / "configs/transfer/finetune_fashion_mnist.yaml")
# 600 training images: 10% = 62 labelled (round(0.1 n_c) per class), 100 held out, 200 test images;
# 2 lr candidates of 3 epochs.
SMALL = [
    "data.limit_train=600",
    "data.limit_test=200",
    "data.fractions=[0.1]",
    "data.heldout=100",
    "images.size=16",
    "images.num_workers=0",
    "finetune.batch_size=20",
    "finetune.lr_grid=[0.05,0.02]",
    "finetune.epochs_grid=[3]",
    "finetune.eval_batch_size=100",
]


def finetune_command(run_dir, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "transfer",
        "finetune",
        "--backbone",
        "random:resnet18",
        "--config",
        CONFIG,
        f"run_dir={run_dir}",
        *SMALL,
        *extra,
    ]


def test_a_killed_finetune_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path):
    straight = subprocess.run(
        finetune_command(tmp_path / "straight"), capture_output=True, text=True, timeout=300
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        finetune_command(run_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first = run_dir / "finetune" / "10%" / "lr0.05_ep3_wd0.pt"
    deadline = time.time() + 240
    while not first.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert first.exists() and process.poll() is None, (
        "the run ended before its first checkpoint could be killed"
    )
    os.killpg(process.pid, signal.SIGKILL)  # mid-candidate: epoch 1 or 2 of 3 saved, nothing scored
    process.wait()
    assert not (run_dir / "metrics.json").exists()
    resumed = subprocess.run(finetune_command(run_dir), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumes at epoch" in (run_dir / "log.txt").read_text()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "straight", run_dir))
    assert a["metrics"] == b["metrics"]
    assert a["fractions"] == b["fractions"]  # every candidate's held-out top-1, the choice
    kept = sorted(p.name for p in (run_dir / "finetune" / "10%").glob("*.pt"))
    chosen = a["fractions"]["10%"]["chosen"]
    assert kept == [f"lr{chosen['lr']:g}_ep{chosen['epochs']}_wd{chosen['weight_decay']:g}.pt"]
    x, y = (
        torch.load(d / "finetune" / "10%" / kept[0], weights_only=True)["model"]
        for d in (tmp_path / "straight", run_dir)
    )
    assert all(torch.equal(x[k], y[k]) for k in x)
    # the record: the split file (10% of each class, names of training images), each candidate
    # scored, the best chosen
    counts = torch.bincount(FashionMNIST("/usr/share/datasets/fashion-mnist", "train", 600).labels)
    split = (run_dir / "split_10%.txt").read_text().split()
    assert len(split) == sum(max(1, round(0.1 * int(n))) for n in counts)
    assert all(name.startswith("fashion_mnist/train/") for name in split)
    scores = a["fractions"]["10%"]["heldout_top1"]
    assert set(scores) == {"lr0.05_ep3_wd0", "lr0.02_ep3_wd0"}
    best = max(scores.values())
    assert scores[kept[0][:-3]] == best and list(scores.values()).index(best) == list(scores).index(
        kept[0][:-3]
    )


def test_held_out_images_lie_outside_every_labelled_subset_and_subsets_are_class_balanced():
    config = load_config(finetune.Config, CONFIG, [*SMALL, "data.fractions=[0.05,0.1]", "seed=3"])
    train_set, _, subsets, heldout = finetune.prepare(config)
    labels = train_set.labels[:600]
    for fraction, indices in subsets.items():
        counts = torch.bincount(labels[indices], minlength=10)
        expected = torch.tensor(
            [max(1, round(fraction * int(n))) for n in torch.bincount(labels, minlength=10)]
        )
        assert torch.equal(counts, expected)
        assert not set(indices) & set(heldout)
    assert len(heldout) == 100 and len(set(heldout)) == 100


def test_multilabel_loss_leaves_difficult_entries_out_and_single_label_is_cross_entropy():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    targets = torch.tensor([[1, -1, 0], [0, 1, -1]])
    z = torch.tensor([2.0, -1.0, 1.0, -2.0])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    by_hand = -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))).mean()
    assert classification_loss(logits, targets).item() == pytest.approx(by_hand.item(), rel=1e-6)
    labels = torch.tensor([0, 1])
    by_hand = -(torch.log_softmax(logits, 1)[[0, 1], labels]).mean()
    assert classification_loss(logits, labels).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert F.cross_entropy(logits, labels).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_the_learning_rate_follows_a_cosine_to_zero_over_every_epoch_of_the_candidate():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1, momentum=0.9, nesterov=True)
    schedule = cosine_schedule(optimizer, 10)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([0.1 * (1 + math.cos(math.pi * k / 10)) / 2 for k in range(10)])


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.fractions=[0.0]", r"data.fractions.*\(0, 1\]"),
        ("data.fractions=[1.5]", r"data.fractions.*\(0, 1\]"),
        (
            "data.heldout=590",
            "data.heldout=590 needs that many training images outside the labelled subsets",
        ),
        ("finetune.batch_size=100", "the 10% subset has 62 images, fewer than one batch"),
        ("data.subsets=simclr", "data.subsets=simclr .* needs data.dataset=imagefolder"),
    ],
)
def test_bad_finetune_input_is_one_line_and_writes_nothing(tmp_path, override, message):
    with pytest.raises(UserError, match=message) as caught:
        run_task(
            "finetune",
            "random:resnet18",
            "ema",
            CONFIG,
            [f"run_dir={tmp_path / 'run'}", *SMALL, override],
        )
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_simclr_split_naming_images_that_are_not_there_is_refused(tmp_path):
    """An ImageNet folder without the 1% subset's images: the split file names images that do not
    exist."""
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            folder = tmp_path / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for k in range(3):
                Image.new("RGB", (8, 8)).save(folder / f"{wnid}_{k}.JPEG")
    with pytest.raises(
        UserError, match=r"12811 images of SimCLR's 1% split are not in .*train \(first: "
    ):
        run_task(
            "finetune",
            "random:resnet18",
            "ema",
            CONFIG,
            [
                f"run_dir={tmp_path / 'run'}",
                "data.dataset=imagefolder",
                f"data.root={tmp_path / 'imagenet'}",
                "data.test_split=val",
                "data.subsets=simclr",
                "data.fractions=[0.01]",
                "data.heldout=1",
            ],
        )
    assert not (tmp_path / "run").exists()


def test_a_diverging_candidate_is_scored_failed_the_search_goes_on_and_a_rerun_keeps_the_record(
    tmp_path,
):
    args = [
        f"run_dir={tmp_path / 'run'}",
        *SMALL,
        "finetune.lr_grid=[1e9,0.05]",
        "finetune.epochs_grid=[2]",
    ]
    run_task("finetune", "random:resnet18", "ema", CONFIG, args)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["fractions"]["10%"]
    assert record["heldout_top1"]["lr1e+09_ep2_wd0"] is None
    assert record["failed"]["lr1e+09_ep2_wd0"].startswith("diverged: loss ")
    assert record["chosen"]["lr"] == 0.05 and record["heldout_top1"]["lr0.05_ep2_wd0"] > 0
    saved = json.loads((tmp_path / "run" / "finetune" / "10%" / "lr1e+09_ep2_wd0.json").read_text())
    assert saved["heldout"] is None and "nan" in saved["failed"] or "inf" in saved["failed"]
    assert not (tmp_path / "run" / "finetune" / "10%" / "lr1e+09_ep2_wd0.pt").exists()


def test_a_grid_where_every_candidate_diverges_is_one_line():
    with pytest.raises(
        UserError,
        match=r"^fine-tuning diverged for every candidate of the grid \(1: first "
        r"lr1e\+09_ep1_wd0, diverged: loss .*\); lower finetune.lr_grid$",
    ):
        run_task(
            "finetune",
            "random:resnet18",
            "ema",
            CONFIG,
            [
                f"run_dir={os.devnull}_never",
                *SMALL,
                "finetune.lr_grid=[1e9]",
                "finetune.epochs_grid=[1]",
            ],
        )


def test_kornblith_candidates_train_a_number_of_steps_with_decay_over_lr_and_bn_momentum_from_the_epoch(
    tmp_path,
):
    """20,000 steps in the protocol, 7 here: 3 steps per epoch, so two whole epochs and one step of
    a third; the
    cosine spans the 7 steps; weight decay / lr; BatchNorm momentum min(10 / s, 0.1)."""
    protocol = FinetuneProtocol(
        batch_size=20,
        steps=7,
        lr_grid=(0.01,),
        weight_decay_grid=(0.0, 1e-4),
        weight_decay_over_lr=True,
        bn_momentum_from_epoch=True,
    )
    assert grid(protocol) == [Candidate(0.01, 0, 0.0, 7), Candidate(0.01, 0, 1e-4, 7)]
    assert grid(protocol)[1].tag == "lr0.01_steps7_wd0.0001"
    assert grid(protocol)[1].effective(protocol) == (0.01, pytest.approx(0.01))  # 1e-4 / 0.01
    scaled = FinetuneProtocol(batch_size=1024, scale_lr_by_batch=True)
    # BYOL: base lr x 1024 / 256
    assert Candidate(0.05, 30, 0.0).effective(scaled) == (pytest.approx(0.2), 0.0)
    # TF: max(1 - 10/s, 0.9)
    assert bn_momentum(3) == 0.1 and bn_momentum(266) == pytest.approx(10 / 266)
    backbone = resolve_backbone("random:resnet18")
    finetuner = Finetuner(
        backbone.model,
        512,
        10,
        protocol,
        Images(size=16, num_workers=0),
        top1,
        0,
        torch.device("cpu"),
        tmp_path,
    )
    images = FashionMNIST("/usr/share/datasets/fashion-mnist", "train", 60)
    model = finetuner.train(grid(protocol)[1], images, "run")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == pytest.approx(0.1) for m in norms)  # s = 3: min(10 / 3, 0.1)
    state = torch.load(tmp_path / "run.pt", weights_only=True)
    assert state["epoch"] == 3 and state["schedule"]["last_epoch"] == 7
    group = state["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == pytest.approx(0.01) and group["nesterov"] and group["lr"] == 0.0
    with_bigger_epochs = Finetuner(
        backbone.model,
        512,
        10,
        FinetuneProtocol(batch_size=2, steps=1, lr_grid=(0.01,), bn_momentum_from_epoch=True),
        Images(size=16, num_workers=0),
        top1,
        0,
        torch.device("cpu"),
        tmp_path,
    )
    # 30 steps per epoch
    model = with_bigger_epochs.train(Candidate(0.01, 0, 0.0, 1), images, "long")
    assert all(
        m.momentum == pytest.approx(10 / 30) if 10 / 30 < 0.1 else m.momentum == pytest.approx(0.1)
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    )


def test_semi_supervised_reports_top5_beside_top1(tmp_path):
    run_task(
        "finetune",
        "random:resnet18",
        "ema",
        CONFIG,
        [
            f"run_dir={tmp_path / 'run'}",
            *SMALL,
            "finetune.lr_grid=[0.05]",
            "finetune.epochs_grid=[1]",
        ],
    )
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(record["metrics"]) == {"top1@10%", "top5@10%"}
    assert record["metrics"]["top1@10%"] <= record["metrics"]["top5@10%"] <= 100
