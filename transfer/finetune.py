"""Fine-tuning the whole network with a new linear head, hyper-parameters chosen on held-out images (BYOL App. C.1).

One candidate is (lr, epochs, weight decay). It trains backbone + a zero-initialised linear head with SGD,
Nesterov momentum 0.9, on random resized crops + horizontal flips, for `epochs` passes over the training images
in global batches of `batch_size` (incomplete batches dropped), the learning rate decaying from lr to 0 along a
cosine:

    lr_k = lr (1 + cos(pi k / K)) / 2,   K = epochs * floor(N / batch_size)

and is scored on held-out images with the eval transform (resize the short side to image_size * resize_ratio,
centre crop). `select_and_finetune` trains every candidate of the grid, keeps the best by the held-out metric
(the first in grid order among ties), and scores it on the test split, or, when a refit set is given (the
classification-transfer protocol: choose on val, retrain on train + val), retrains the chosen candidate on it
first.

Each image's crop and flip are drawn from (seed, epoch, index) and the batches from (seed, epoch)
(pretrain.data.Augmented / EpochBatchSampler), and the state is saved after every epoch: a run stopped at any
point and rerun continues from the last epoch and ends with the same numbers as an uninterrupted one. A finished
candidate leaves a .json of its scores in the run dir, so a rerun skips it.

Under several processes (torchrun, SLURM tasks) the network is wrapped in DistributedDataParallel with its
BatchNorm computed over the global batch (pretrain.sync_batchnorm), each rank takes its contiguous slice of every
global batch, and the evaluation is sharded by whole batches and gathered: the processes train the network one
process would, up to float rounding.
Single-label sets train with cross-entropy and multi-label sets (VOC2007: targets 1 / -1 / 0 = difficult) with a
per-class binary cross-entropy that leaves the difficult entries out.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from pretrain.checks import (NON_NEGATIVE, POSITIVE_INT, at_least, between, checked, each, greater_than)
from pretrain.errors import UserError

log = logging.getLogger("transfer")


@dataclass
class FinetuneProtocol:
    batch_size: int = checked(1024, POSITIVE_INT)              # global, over all processes
    lr_grid: tuple = checked((0.01, 0.02, 0.05, 0.1, 0.005), each(greater_than(0)))
    epochs_grid: tuple = checked((30, 50), each(POSITIVE_INT))
    weight_decay_grid: tuple = checked((0.0,), each(NON_NEGATIVE))
    momentum: float = checked(0.9, between(0, 1, open_high=True))  # Nesterov
    crop_scale: tuple = checked((0.08, 1.0), each(between(0, 1), 2))  # random resized crop's area range
    eval_batch_size: int = checked(256, POSITIVE_INT)


@dataclass
class Images:
    """How images enter the network: training crops of `size`; for evaluation (and frozen features) the short side
    resized to size * resize_ratio and a centre crop of `size`; then normalised."""
    size: int = checked(224, at_least(8))
    resize_ratio: float = checked(256 / 224, at_least(1.0))
    mean: tuple = checked((0.485, 0.456, 0.406), each(between(0, 1), 3))
    std: tuple = checked((0.229, 0.224, 0.225), each(greater_than(0), 3))
    num_workers: int = checked(2, NON_NEGATIVE)


def eval_transform(images: Images):
    """Resize the short side to size * resize_ratio, centre-crop `size`, normalise (pretrain.augment)."""
    from pretrain.augment import eval_transform as resize_crop_normalise
    return resize_crop_normalise(images.size, images.mean, images.std, images.resize_ratio)


@dataclass(frozen=True)
class Candidate:
    lr: float
    epochs: int
    weight_decay: float

    @property
    def tag(self) -> str:
        return f"lr{self.lr:g}_ep{self.epochs}_wd{self.weight_decay:g}"

    def as_dict(self) -> dict:
        return {"lr": self.lr, "epochs": self.epochs, "weight_decay": self.weight_decay}


def grid(protocol: FinetuneProtocol) -> list[Candidate]:
    """Every (lr, epochs, weight decay) of the protocol's grids, in grid order."""
    return [Candidate(float(lr), int(epochs), float(wd)) for lr, epochs, wd in
            itertools.product(protocol.lr_grid, protocol.epochs_grid, protocol.weight_decay_grid)]


# ------------------------------------------------------------------------------------------------- data

def train_transform(images: Images, crop_scale: tuple):
    from torchvision.transforms import InterpolationMode, v2
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(images.size, scale=tuple(crop_scale),
                                                          interpolation=InterpolationMode.BICUBIC, antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(images.mean), list(images.std))])


def _as_target(label) -> Tensor:
    return label if isinstance(label, Tensor) else torch.tensor(label)


def collate_labelled(items: list) -> tuple[Tensor, Tensor]:
    """Stack (image, label) pairs; a corrupt image (pretrain.data.CorruptImage) is a one-line error naming it."""
    from pretrain.data import CorruptImage
    for item in items:
        if isinstance(item, CorruptImage):
            raise UserError(f"cannot read image {item.path}: {item.reason}")
    images, labels = zip(*items)
    return torch.stack(images), torch.stack([_as_target(label) for label in labels])


# ---------------------------------------------------------------------------------------------- network

class Classifier(nn.Module):
    """backbone (fc = Identity) -> linear head, the head zero-initialised."""

    def __init__(self, backbone: nn.Module, width: int, num_classes: int):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(width, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def classification_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for class indices; for VOC-style multi-label targets (1 / -1 / 0) the mean binary
    cross-entropy over the non-difficult (non-zero) entries."""
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets)
    known = targets != 0
    return F.binary_cross_entropy_with_logits(logits[known], (targets[known] > 0).float())


# --------------------------------------------------------------------------------------------- training

@dataclass
class Finetuner:
    """Trains and scores candidates of one protocol on one backbone; `metric(scores, targets) -> float`."""
    make_backbone: Callable[[], nn.Module]
    width: int
    num_classes: int
    protocol: FinetuneProtocol
    images: Images
    metric: Callable[[Tensor, Tensor], float]
    seed: int
    device: torch.device
    folder: Path                      # checkpoints and scores of each candidate
    save: bool = True                 # rank 0 writes

    def build(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return Classifier(self.make_backbone(), self.width, self.num_classes).to(self.device)

    def train(self, candidate: Candidate, train_set: Dataset, name: str) -> nn.Module:
        """The network after `candidate.epochs` epochs on train_set, resuming from folder/name.pt."""
        from pretrain.data import Augmented, EpochBatchSampler
        from pretrain.distributed import check_global_batch, detect
        from pretrain.rundir import Progress, cosine_schedule
        p, processes = self.protocol, detect()
        check_global_batch("finetune.batch_size", p.batch_size, processes.world_size)
        per_epoch = len(train_set) // p.batch_size
        if per_epoch == 0:
            raise UserError(f"finetune.batch_size={p.batch_size} is larger than the {len(train_set)} training images; "
                            f"choose a batch size of at most {len(train_set)}")
        model = self.build()
        if processes.is_distributed:  # BatchNorm over the global batch, so that the processes train one network
            from pretrain.sync_batchnorm import convert_sync_batchnorm
            model = convert_sync_batchnorm(model, self.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=candidate.lr, momentum=p.momentum, nesterov=True,
                                    weight_decay=candidate.weight_decay)
        schedule = cosine_schedule(optimizer, candidate.epochs * per_epoch)
        progress = Progress(self.folder / f"{name}.pt", "epoch", model=model, optimizer=optimizer, schedule=schedule)
        start = progress.restore()
        if 0 < start < candidate.epochs:
            log.info("finetune: %s resumes at epoch %d of %d", name, start, candidate.epochs)
        trained = nn.parallel.DistributedDataParallel(model) if processes.is_distributed else model
        augmented = Augmented(train_set, train_transform(self.images, p.crop_scale), self.seed)
        for epoch in range(start, candidate.epochs):
            model.train()
            sampler = EpochBatchSampler(len(train_set), p.batch_size, self.seed, epoch, 0, processes.rank,
                                        processes.world_size)
            loader = DataLoader(augmented, batch_sampler=sampler, num_workers=self.images.num_workers,
                                collate_fn=collate_labelled, persistent_workers=False)
            for images, targets in loader:
                loss = classification_loss(trained(images.to(self.device)), targets.to(self.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            if not math.isfinite(loss.item()):
                raise UserError(f"fine-tuning {name} diverged (loss {loss.item()}) at epoch {epoch + 1}; lower its lr "
                                f"({candidate.lr:g})")
            if self.save:
                progress.save(epoch + 1)
            log.info("finetune: %s epoch %d/%d loss %.4f", name, epoch + 1, candidate.epochs, loss.item())
        return model

    @torch.no_grad()
    def score(self, model: nn.Module, dataset: Dataset) -> float:
        """The metric on dataset (eval transform), the images sharded over the processes by whole batches."""
        from pretrain.distributed import detect
        from transfer.tasks.classification import Transformed, batch_shard
        p, processes = self.protocol, detect()
        view = Transformed(dataset, eval_transform(self.images))  # a corrupt image: a one-line error naming it
        shard = batch_shard(len(view), p.eval_batch_size, processes.rank, processes.world_size)
        loader = DataLoader(Subset(view, shard), batch_size=p.eval_batch_size, num_workers=self.images.num_workers,
                            collate_fn=collate_labelled)
        model.eval()
        outputs, targets = [], []
        for images, labels in loader:
            outputs.append(model(images.to(self.device)).float().cpu())
            targets.append(labels)
        if processes.is_distributed:
            import torch.distributed as dist
            gathered = [None] * processes.world_size
            dist.all_gather_object(gathered, (outputs, targets))
            outputs = [o for part, _ in gathered for o in part]
            targets = [t for _, part in gathered for t in part]
        return self.metric(torch.cat(outputs), torch.cat(targets))

    def evaluated(self, name: str, work: Callable[[], dict]) -> dict:
        """folder/name.json if a previous run wrote it, else work()'s result, written there (by rank 0)."""
        from pretrain.distributed import rank0_decides
        path = self.folder / f"{name}.json"
        if rank0_decides(path.exists()):
            return json.loads(path.read_text())
        result = work()
        if self.save:
            from pretrain.io import atomic_write_bytes
            atomic_write_bytes(path, json.dumps(result, indent=2).encode())
        return result


def select_and_finetune(finetuner: Finetuner, train: Dataset, heldout: Dataset, test: Dataset,
                        refit: Dataset | None = None) -> dict:
    """Train every candidate on `train`, score each on `heldout`, keep the best (the first among ties) and score it
    on `test`: the network the selection trained, or, with `refit`, the chosen candidate retrained on `refit`.
    Returns {"test", "chosen": {lr, epochs, weight_decay}, "heldout": {tag: score}}."""
    finetuner.folder.mkdir(parents=True, exist_ok=True)
    candidates = grid(finetuner.protocol)

    def run(candidate: Candidate) -> dict:
        model = finetuner.train(candidate, train, candidate.tag)
        return {"heldout": finetuner.score(model, heldout), **candidate.as_dict()}
    on_heldout = {}
    for candidate in candidates:
        on_heldout[candidate.tag] = finetuner.evaluated(candidate.tag, lambda c=candidate: run(c))["heldout"]
        log.info("finetune: %s -> held-out %.2f", candidate.tag, on_heldout[candidate.tag])
    best = max(candidates, key=lambda c: (on_heldout[c.tag], -candidates.index(c)))

    def final() -> dict:
        if refit is not None:
            model = finetuner.train(best, refit, "refit_" + best.tag)
        else:  # the selection's own network, from its last checkpoint
            model = finetuner.train(best, train, best.tag)
        return {"test": finetuner.score(model, test), **best.as_dict()}
    result = finetuner.evaluated("final", final)
    if finetuner.save:  # the chosen network's checkpoint stays; the others are no longer needed
        for candidate in candidates:
            if candidate != best:
                (finetuner.folder / f"{candidate.tag}.pt").unlink(missing_ok=True)
    return {"test": result["test"], "chosen": best.as_dict(), "heldout": on_heldout}
