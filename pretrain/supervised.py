"""The positive control: the pretraining network trained on the labels instead, for the same budget.

    python -m pretrain.supervised --config configs/pretrain/fashion_mnist_resnet18.yaml run_dir=runs/supervised

It reads the pretraining config (data, architecture, epochs, batch size, seed, image size and normalisation) and
trains backbone + a linear classifier with cross-entropy: Adam (lr 1e-3, weight decay 1e-4), a cosine decay to 0
over the same number of steps as pretraining, random resized crops (area 0.35-1) and flips. Evaluated beside
the SSL-HSIC backbone and random init, it shows how far apart the transfer evaluation can put two backbones.

RUN_DIR gets config.yaml, log.txt, checkpoints/progress.pt (resumable per epoch), backbone.pth (the torchvision
state dict without the classifier: what every transfer command reads) and metrics.json (the last epoch's
training loss and accuracy). A rerun of a finished run reports it.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Sequence

log = logging.getLogger("pretrain.supervised")
RERUN_SAFE = {"run_dir", "data.num_workers", "device"}


def train_supervised(config) -> dict:
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf
    from torch import nn
    from torchvision.transforms import InterpolationMode, v2
    from pretrain.data import build_dataset
    from common.files import atomic_torch_save
    from common.records import write_metrics
    from pretrain.networks import build_resnet, feature_width
    from common.rundir import (Progress, RunDirLock, attach_log, detach_log, pick_device, refuse_other_config,
                               start_run_dir)
    from common.schedule import cosine_schedule
    run_dir = Path(config.run_dir)
    refuse_other_config(run_dir, config, RERUN_SAFE, "supervised")
    if (run_dir / "metrics.json").exists():
        done = json.loads((run_dir / "metrics.json").read_text())
        print(f"supervised: already done in {run_dir}: {done['metrics']}")
        return done
    d, c = config.data, config.optim
    dataset = build_dataset(d.dataset, d.root, d.split if d.dataset == "imagefolder" else "train", d.limit)
    steps_per_epoch = len(dataset) // c.batch_size
    if steps_per_epoch == 0:
        from common.errors import UserError
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one batch of {c.batch_size}")
    lock = RunDirLock(run_dir).acquire()
    start_run_dir(run_dir, config)
    handler = attach_log(log, run_dir)
    try:
        device = pick_device(config.device)
        torch.manual_seed(config.seed)
        backbone = build_resnet(config.model.backbone)
        model = nn.Sequential(backbone, nn.Linear(feature_width(config.model.backbone), len(dataset.classes))).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        total_steps = int(c.epochs * len(dataset) // c.batch_size)
        schedule = cosine_schedule(optimizer, total_steps)
        progress = Progress(run_dir / "checkpoints" / "progress.pt", "epoch", model=model, optimizer=optimizer,
                            schedule=schedule)
        first = progress.restore()
        if first:
            log.info("supervised: resuming at epoch %d", first)
        transform = v2.Compose([
            v2.RandomResizedCrop(d.image_size, scale=(0.35, 1.0), interpolation=InterpolationMode.BICUBIC,
                                 antialias=True),
            v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(config.augment.mean), list(config.augment.std))])
        epochs, step, started = math.ceil(c.epochs), first * steps_per_epoch, time.time()
        stats = {}
        for epoch in range(first, epochs):
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed * 7_919 + epoch))
            correct = seen = 0
            loss_sum = 0.0
            for batch in order[:steps_per_epoch * c.batch_size].view(-1, c.batch_size):
                if step >= total_steps:
                    break
                items = [dataset[int(i)] for i in batch]
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(config.seed * 1_000_003 + step)
                    images = torch.stack([transform(image) for image, _ in items]).to(device)
                labels = torch.tensor([label for _, label in items], device=device)
                logits = model(images)
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                loss_sum += loss.item() * len(batch)
                correct += (logits.argmax(1) == labels).sum().item()
                seen += len(batch)
            stats = {"loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1)}
            log.info("supervised: epoch %d/%d loss %.4f train top-1 %.2f", epoch + 1, epochs, stats["loss"],
                     stats["train_top1"])
            progress.save(epoch + 1)
        state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
        atomic_torch_save(state, run_dir / "backbone.pth")
        write_metrics(run_dir, task="supervised", dataset=d.dataset,
                      backbone={"path": str((run_dir / "backbone.pth").resolve()), "arch": config.model.backbone},
                      protocol=f"cross-entropy on the labels, Adam, {c.epochs} epochs (the pretraining budget)",
                      metrics=stats, seed=config.seed, config=OmegaConf.to_container(config, resolve=True),
                      wall_time_s=time.time() - started)
        log.info("supervised: backbone %s", run_dir / "backbone.pth")
        return json.loads((run_dir / "metrics.json").read_text())
    finally:
        detach_log(log, handler)
        lock.release()


def main(argv: Sequence[str] | None = None) -> None:
    from common.cli import config_parser
    from common.config import load_config
    from pretrain.schema import PretrainConfig
    parser = config_parser("python -m pretrain.supervised", "Train the pretraining network on the labels "
                           "(the positive control).", __doc__.split("\n\n")[1])
    args = parser.parse_args(argv)
    train_supervised(load_config(PretrainConfig, args.config, args.overrides))


if __name__ == "__main__":
    from common.cli import run_main
    sys.exit(run_main(main))
