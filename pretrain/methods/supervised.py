"""The positive control as a method on pretrain.engine.Engine: the pretraining network trained on
the labels.

Backbone f + a linear classifier W on the labels y, for the pretraining's budget:

    loss = cross_entropy(W f(x), y),   Adam (lr 1e-3, weight decay 1e-4),   lr_t = 1e-3 (1 + cos(pi t / T)) / 2

with T the pretraining's step count int(epochs * N // B), random resized crops (area 0.35-1) and
flips. An epoch shuffles with derive_seed(seed, "supervised.order", epoch); the crops of step t are
drawn under
derive_seed(seed, "supervised.views", t). The checkpoint (checkpoints/progress.pt) is {"epoch": epochs done,
"model", "optimizer", "schedule"}; one written mid-epoch (a stop signal) adds "step" and "window"
(the epoch's running loss sum, correct and seen), so that the resumed epoch reports what an
uninterrupted one would. A completed run leaves backbone.pth (the torchvision state dict without the
classifier) and metrics.json (the last epoch's training loss and top-1)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torchvision.transforms import InterpolationMode, v2

from common.distributed import DistributedEnv
from common.errors import UserError
from common.files import atomic_torch_save
from common.rundir import pick_device
from common.schedule import cosine_schedule
from common.seeds import derive_seed
from pretrain.data import build_dataset
from pretrain.networks import build_resnet, feature_width

log = logging.getLogger("pretrain.supervised")


class Supervised:
    name, log = "supervised", log
    may_change = {"run_dir", "data.num_workers", "device"}
    checkpoint_file, previous_file, label = "progress.pt", "progress.previous.pt", "supervised"
    done_when_metrics_exist = True

    def __init__(self, config: DictConfig, run_dir: Path):
        self.config, self.cross_entropy = config, F.cross_entropy
        d, c = config.data, config.optim
        self.dataset = build_dataset(
            d.dataset, d.root, d.split if d.dataset == "imagefolder" else "train", d.limit
        )
        self.steps_per_epoch = len(self.dataset) // c.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the dataset has {len(self.dataset)} images, fewer than one batch of "
                f"{c.batch_size}"
            )
        self.dist = DistributedEnv()  # one process
        self.device = pick_device(config.device)
        torch.manual_seed(derive_seed(config.seed, "pretrain.init"))
        self.backbone = build_resnet(config.model.backbone)
        self.model = nn.Sequential(
            self.backbone,
            nn.Linear(feature_width(config.model.backbone), len(self.dataset.classes)),
        ).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, weight_decay=1e-4)
        self.total_steps = int(c.epochs * len(self.dataset) // c.batch_size)
        self.schedule = cosine_schedule(self.optimizer, self.total_steps)
        self.epochs = math.ceil(c.epochs)
        # whole epochs of the budget
        self.stop_step = min(self.total_steps, self.epochs * self.steps_per_epoch)
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(
                    d.image_size,
                    scale=(0.35, 1.0),
                    interpolation=InterpolationMode.BICUBIC,
                    antialias=True,
                ),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(config.augment.mean), list(config.augment.std)),
            ]
        )
        self.window = [0.0, 0, 0]  # this epoch's loss sum, correct, seen

    # -------------------------------------------------------------------------------- checkpoints

    def state_dict(self, step: int, elapsed_s: float) -> dict:
        epoch, within = divmod(step, self.steps_per_epoch)
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
        }
        if within and step < self.stop_step:  # mid-epoch (a stop signal)
            state.update(step=step, window=torch.tensor(self.window, dtype=torch.float64))
        return state

    def load_state_dict(self, state: dict) -> tuple[int, float]:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if "step" in state:
            loss_sum, correct, seen = state["window"].tolist()
            self.window = [loss_sum, int(correct), int(seen)]
            return int(state["step"]), 0.0
        return int(state["epoch"]) * self.steps_per_epoch, 0.0

    @staticmethod
    def read_checkpoint(path: Path) -> dict:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UserError(
                f"checkpoint {path} cannot be read ({type(error).__name__}); remove it to start "
                f"over"
            ) from None

    # -------------------------------------------------------------------------------------- steps

    def loader(self, epoch: int, start_batch: int):
        """Batches of dataset indices: epoch e's permutation, in whole batches."""
        batch = self.config.optim.batch_size
        order = torch.randperm(
            len(self.dataset),
            generator=torch.Generator().manual_seed(
                derive_seed(self.config.seed, "supervised.order", epoch)
            ),
        )
        return order[: self.steps_per_epoch * batch].view(-1, batch)[start_batch:]

    def images(self, batch: torch.Tensor) -> int:
        return len(batch)

    def train_step(self, batch: torch.Tensor, step: int) -> dict[str, float]:
        if step % self.steps_per_epoch == 0:
            self.window = [0.0, 0, 0]
        items = [self.dataset[int(i)] for i in batch]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.config.seed, "supervised.views", step))
            images = torch.stack([self.transform(image) for image, _ in items]).to(self.device)
        labels = torch.tensor([label for _, label in items], device=self.device)
        logits = self.model(images)
        loss = self.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.window[0] += loss.item() * len(batch)
        self.window[1] += (logits.argmax(1) == labels).sum().item()
        self.window[2] += len(batch)
        return {"step_loss": loss.item()}

    # ------------------------------------------------------------------------------ engine's hooks

    def log_due(self, step: int) -> bool:  # at the end of each epoch
        return step % self.steps_per_epoch == 0 or step == self.stop_step

    def checkpoint_due(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0

    def complete(self, step: int) -> bool:
        return step >= self.stop_step

    def log_stats(self, stats: dict[str, float], step: int) -> dict[str, float]:
        """The epoch's mean training loss and top-1 (%)."""
        loss_sum, correct, seen = self.window
        return {
            "loss": loss_sum / max(seen, 1),
            "train_top1": 100.0 * correct / max(seen, 1),
            **stats,
        }

    def export(self, run_dir: Path) -> None:
        state = {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()}
        atomic_torch_save(state, run_dir / "backbone.pth")
        log.info("supervised: backbone %s", run_dir / "backbone.pth")

    def metrics(self, stats: dict[str, float], skipped: int, step: int) -> dict:
        c = self.config
        return dict(
            task="supervised",
            dataset=c.data.dataset,
            backbone={
                "path": str((Path(c.run_dir) / "backbone.pth").resolve()),
                "arch": c.model.backbone,
            },
            protocol=f"cross-entropy on the labels, Adam, {c.optim.epochs} epochs (the pretraining budget)",
            metrics={k: stats[k] for k in ("loss", "train_top1") if k in stats},
            extra={},
        )
