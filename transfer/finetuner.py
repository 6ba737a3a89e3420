"""Fine-tuning the whole network with a new linear head, hyper-parameters chosen on held-out images.

Two published protocols use it:
* semi-supervised (BYOL App. C.1): lr x epochs chosen on held-out ImageNet images; BYOL's released
  code multiplies its base lr by batch/256 (`scale_lr_by_batch`);
* classification transfer (Kornblith et al. 2019 / SimCLR App. B.8 / BYOL App. D): 20,000 steps at
  batch 256 (`steps`), lr x weight decay chosen on the validation split, the weight decay divided by
  the lr (`weight_decay_over_lr`), BatchNorm momentum max(1 - 10/s, 0.9) in TensorFlow's convention,
  s the steps per epoch (`bn_momentum_from_epoch`: torch's momentum is 1 minus that, min(10/s,
  0.1)).

One candidate is (lr, length, weight decay), its length in epochs or in steps. It trains backbone +
a zero-initialised linear head with SGD, Nesterov momentum 0.9, on random resized crops + horizontal
flips, in global batches of `batch_size` (incomplete batches dropped), the learning rate decaying
from lr to 0 along a cosine:

    lr_k = lr (1 + cos(pi k / K)) / 2,   K = steps, or epochs * floor(N / batch_size)

and is scored on held-out images with the eval transform (resize the short side to image_size *
resize_ratio, centre crop). `select_and_finetune` trains every candidate of the grid, keeps the best
by the held-out metric (the first in grid order among ties), and scores it on the test split, or,
when a refit set is given (the classification-transfer protocol: choose on val, retrain on train +
val), retrains the chosen candidate on it first. A candidate whose loss turns non-finite is scored
as failed (its .json records the loss and the step) and the search goes on; a grid with no finite
candidate is an error.

Each image's crop and flip are drawn from (seed, epoch, index) and the batches from (seed, epoch)
(pretrain.data.Augmented / EpochBatchSampler), and the state is saved at the end of an epoch once
`checkpoint_steps` steps have passed since the last save (0: every epoch) and at the end: a run
stopped at any point and rerun continues from the last save and ends with the same numbers as an
uninterrupted one. A finished candidate leaves a .json of its scores in the run dir, so a rerun
skips it.

Under several processes (torchrun, SLURM tasks) the network is wrapped in DistributedDataParallel
with its BatchNorm computed over the global batch (pretrain.sync_batchnorm), each rank takes its
contiguous slice of every global batch, and the evaluation is sharded by whole batches and gathered:
the processes train the network one process would, up to float rounding.
Single-label sets train with cross-entropy and multi-label sets (VOC2007: targets 1 / -1 / 0 = difficult) with a
per-class binary cross-entropy that leaves the difficult entries out.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.transforms import v2

from common.checks import NON_NEGATIVE, POSITIVE_INT, at_least, between, checked, each, greater_than
from common.distributed import check_global_batch, detect, rank0_decides
from common.errors import UserError
from common.files import atomic_write_bytes, remove_partial_writes
from common.rundir import Progress
from common.schedule import cosine_schedule
from common.seeds import derive_seed
from pretrain.augment import InceptionCrop
from pretrain.augment import eval_transform as resize_crop_normalise
from pretrain.data import Augmented, CorruptImage, EpochBatchSampler
from pretrain.sync_batchnorm import convert_sync_batchnorm
from transfer.features import Transformed, batch_shard

log = logging.getLogger("transfer")


@dataclass
class FinetuneProtocol:
    batch_size: int = checked(1024, POSITIVE_INT)  # global, over all processes
    lr_grid: tuple = checked((0.01, 0.02, 0.05, 0.1, 0.005), each(greater_than(0)))
    # the lr trained with is the grid's x batch_size / 256 (BYOL's code)
    scale_lr_by_batch: bool = False
    epochs_grid: tuple = checked((30, 50), each(POSITIVE_INT))
    # > 0: every candidate trains this many steps (epochs_grid is not used)
    steps: int = checked(0, NON_NEGATIVE)
    weight_decay_grid: tuple = checked((0.0,), each(NON_NEGATIVE))
    # the decay trained with is the grid's / the candidate's grid lr (Kornblith)
    weight_decay_over_lr: bool = False
    momentum: float = checked(0.9, between(0, 1, open_high=True))  # Nesterov
    # BatchNorm momentum min(10 / s, 0.1), s = steps per epoch (Kornblith)
    bn_momentum_from_epoch: bool = False
    # random resized crop's area range
    crop_scale: tuple = checked((0.08, 1.0), each(between(0, 1), 2))
    eval_batch_size: int = checked(256, POSITIVE_INT)
    # save after the epoch that passes this many steps; 0: each
    checkpoint_steps: int = checked(0, NON_NEGATIVE)


@dataclass
class Images:
    """How images enter the network: training crops of `size`; for evaluation (and frozen features)
    the short side
    resized to size * resize_ratio and a centre crop of `size`; then normalised."""

    size: int = checked(224, at_least(8))
    resize_ratio: float = checked(256 / 224, at_least(1.0))
    mean: tuple = checked((0.485, 0.456, 0.406), each(between(0, 1), 3))
    std: tuple = checked((0.229, 0.224, 0.225), each(greater_than(0), 3))
    num_workers: int = checked(2, NON_NEGATIVE)


def eval_transform(images: Images):
    """Resize the short side to size * resize_ratio, centre-crop `size`, normalise
    (pretrain.augment)."""
    return resize_crop_normalise(images.size, images.mean, images.std, images.resize_ratio)


@dataclass(frozen=True)
class Candidate:
    """A point of the grid: its lr, its length (epochs, or steps when steps > 0) and its weight
    decay, as the grid
    gives them; `effective` turns them into what the optimizer uses."""

    lr: float
    epochs: int
    weight_decay: float
    steps: int = 0

    @property
    def tag(self) -> str:
        length = f"steps{self.steps}" if self.steps else f"ep{self.epochs}"
        return f"lr{self.lr:g}_{length}_wd{self.weight_decay:g}"

    def as_dict(self) -> dict:
        length = {"steps": self.steps} if self.steps else {"epochs": self.epochs}
        return {"lr": self.lr, **length, "weight_decay": self.weight_decay}

    def effective(self, protocol: FinetuneProtocol) -> tuple[float, float]:
        """(lr, weight decay) for the optimizer: lr x batch/256 with scale_lr_by_batch, weight decay
        / lr (the grid's
        lr) with weight_decay_over_lr."""
        lr = self.lr * protocol.batch_size / 256 if protocol.scale_lr_by_batch else self.lr
        decay = self.weight_decay / self.lr if protocol.weight_decay_over_lr else self.weight_decay
        return lr, decay


def grid(protocol: FinetuneProtocol) -> list[Candidate]:
    """Every (lr, length, weight decay) of the protocol's grids, in grid order; the length is
    `steps` when it is
    set, else each of epochs_grid."""
    lengths = (
        [(0, protocol.steps)]
        if protocol.steps
        else [(int(epochs), 0) for epochs in protocol.epochs_grid]
    )
    return [
        Candidate(float(lr), epochs, float(wd), steps)
        for lr, (epochs, steps), wd in itertools.product(
            protocol.lr_grid, lengths, protocol.weight_decay_grid
        )
    ]


def bn_momentum(steps_per_epoch: int) -> float:
    """Kornblith et al.'s BatchNorm momentum in torch's convention: 1 - max(1 - 10 / s, 0.9) =
    min(10 / s, 0.1)."""
    return min(10.0 / steps_per_epoch, 0.1)


class Diverged(Exception):
    """A candidate's training loss turned non-finite: scored as failed, the search goes on."""


# -------------------------------------------------------------------------------------------------
# data


def train_transform(images: Images, crop_scale: tuple):
    """The official random crop (pretrain.augment.InceptionCrop: BYOL's _decode_and_random_crop,
    TensorFlow's
    Inception-style crop of Kornblith et al.) + a flip, normalised."""

    return v2.Compose(
        [
            v2.ToImage(),
            InceptionCrop(images.size, scale=tuple(crop_scale)),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(images.mean), list(images.std)),
        ]
    )


def _as_target(label) -> Tensor:
    return label if isinstance(label, Tensor) else torch.tensor(label)


def collate_labelled(items: list) -> tuple[Tensor, Tensor]:
    """Stack (image, label) pairs; a corrupt image (pretrain.data.CorruptImage) is a one-line
    error naming it."""
    for item in items:
        if isinstance(item, CorruptImage):
            raise UserError(f"cannot read image {item.path}: {item.reason}")
    images, labels = zip(*items)
    return torch.stack(images), torch.stack([_as_target(label) for label in labels])


# ----------------------------------------------------------------------------------------------
# network


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
    """Cross-entropy for class indices; for VOC-style multi-label targets (1 / -1 / 0) the mean
    binary
    cross-entropy over the non-difficult (non-zero) entries."""
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets)
    known = targets != 0
    return F.binary_cross_entropy_with_logits(logits[known], (targets[known] > 0).float())


# ---------------------------------------------------------------------------------------------
# training


class EpochsBatchSampler(Sampler):
    """pretrain.data.EpochBatchSampler over epochs first .. last - 1 in a row, so that one
    DataLoader (and its
    workers) serves a candidate's whole training, however short its epochs."""

    def __init__(
        self, size: int, global_batch: int, seed: int, epochs: range, rank: int, world_size: int
    ):
        self.epochs = [
            EpochBatchSampler(size, global_batch, seed, epoch, 0, rank, world_size)
            for epoch in epochs
        ]

    def __len__(self) -> int:
        return sum(len(sampler) for sampler in self.epochs)

    def __iter__(self):
        for sampler in self.epochs:
            yield from sampler


@dataclass
class Finetuner:
    """Trains and scores candidates of one protocol on one backbone; `metric(scores, targets) ->
    float` chooses,
    and `test_metrics` ({name: metric}) are reported beside it on the test split."""

    make_backbone: Callable[[], nn.Module]
    width: int
    num_classes: int
    protocol: FinetuneProtocol
    images: Images
    metric: Callable[[Tensor, Tensor], float]
    seed: int
    device: torch.device
    folder: Path  # checkpoints and scores of each candidate
    save: bool = True  # rank 0 writes
    test_metrics: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        torch.manual_seed(derive_seed(self.seed, "task.init"))  # the new head's init
        return Classifier(self.make_backbone(), self.width, self.num_classes).to(self.device)

    def train(self, candidate: Candidate, train_set: Dataset, name: str) -> nn.Module:
        """The network after the candidate's epochs or steps on train_set, resuming from
        folder/name.pt. Raises
        Diverged when the loss turns non-finite (checked at the end of every epoch, on every rank
        together)."""
        p, processes = self.protocol, detect()
        check_global_batch("finetune.batch_size", p.batch_size, processes.world_size)
        per_epoch = len(train_set) // p.batch_size
        if per_epoch == 0:
            raise UserError(
                f"finetune.batch_size={p.batch_size} is larger than the {len(train_set)} training "
                f"images; "
                f"choose a batch size of at most {len(train_set)}"
            )
        total = candidate.steps or candidate.epochs * per_epoch
        epochs = -(-total // per_epoch)
        model = self.build()
        if p.bn_momentum_from_epoch:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.momentum = bn_momentum(per_epoch)
        # BatchNorm over the global batch, so that the processes train one network
        if processes.is_distributed:
            model = convert_sync_batchnorm(model, self.device)
        lr, weight_decay = candidate.effective(p)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=p.momentum, nesterov=True, weight_decay=weight_decay
        )
        schedule = cosine_schedule(optimizer, total)
        progress = Progress(
            self.folder / f"{name}.pt", "epoch", model=model, optimizer=optimizer, schedule=schedule
        )
        if self.save:  # rank 0 alone writes it
            remove_partial_writes(self.folder, log, f"{name}.pt")
        start = progress.restore()
        if 0 < start < epochs:
            log.info("finetune: %s resumes at epoch %d of %d", name, start, epochs)
        trained = nn.parallel.DistributedDataParallel(model) if processes.is_distributed else model
        augmented = Augmented(train_set, train_transform(self.images, p.crop_scale), self.seed)
        sampler = EpochsBatchSampler(
            len(train_set),
            p.batch_size,
            self.seed,
            range(start, epochs),
            processes.rank,
            processes.world_size,
        )
        loader = DataLoader(
            augmented,
            batch_sampler=sampler,
            num_workers=self.images.num_workers,
            collate_fn=collate_labelled,
        )
        step, saved, bad = start * per_epoch, start * per_epoch, torch.zeros((), device=self.device)
        model.train()
        for images, targets in loader:
            loss = classification_loss(trained(images.to(self.device)), targets.to(self.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).float())
            step += 1
            if step % per_epoch and step < total:
                continue
            epoch = -(-step // per_epoch)
            if processes.is_distributed:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item():
                raise Diverged(f"loss {loss.item()} at step {step} (epoch {epoch})")
            # logged before the save: an epoch whose state survives a kill has its loss in the log
            log.info("finetune: %s epoch %d/%d loss %.4f", name, epoch, epochs, loss.item())
            if self.save and (step == total or step - saved >= p.checkpoint_steps):
                progress.save(epoch)
                saved = step
            if step == total:
                break
        return model

    @torch.no_grad()
    def predict(self, model: nn.Module, dataset: Dataset) -> tuple[Tensor, Tensor]:
        """(outputs, targets) on dataset (eval transform), the images sharded over the processes
        by whole batches."""
        p, processes = self.protocol, detect()
        # a corrupt image: a one-line error naming it
        view = Transformed(dataset, eval_transform(self.images))
        shard = batch_shard(len(view), p.eval_batch_size, processes.rank, processes.world_size)
        loader = DataLoader(
            Subset(view, shard),
            batch_size=p.eval_batch_size,
            num_workers=self.images.num_workers,
            collate_fn=collate_labelled,
        )
        model.eval()
        outputs, targets = [], []
        for images, labels in loader:
            outputs.append(model(images.to(self.device)).float().cpu())
            targets.append(labels)
        if processes.is_distributed:
            gathered = [None] * processes.world_size
            dist.all_gather_object(gathered, (outputs, targets))
            outputs = [o for part, _ in gathered for o in part]
            targets = [t for _, part in gathered for t in part]
        return torch.cat(outputs), torch.cat(targets)

    def score(self, model: nn.Module, dataset: Dataset) -> float:
        return self.metric(*self.predict(model, dataset))

    def evaluated(self, name: str, work: Callable[[], dict]) -> dict:
        """folder/name.json if a previous run wrote it, else work()'s result, written there (by
        rank 0)."""
        path = self.folder / f"{name}.json"
        if rank0_decides(path.exists()):
            return json.loads(path.read_text())
        result = work()
        if self.save:
            atomic_write_bytes(path, json.dumps(result, indent=2).encode())
        return result


def select_and_finetune(
    finetuner: Finetuner,
    train: Dataset,
    heldout: Dataset,
    test: Dataset,
    refit: Dataset | None = None,
) -> dict:
    """Train every candidate on `train`, score each on `heldout`, keep the best (the first among
    ties) and score it on `test`: the network the selection trained, or, with `refit`, the chosen
    candidate retrained on `refit`. A candidate that diverges scores None and is recorded in
    "failed" with its loss; a grid where every candidate diverged is a UserError. Returns {"test",
    "test_metrics": {name: value}, "chosen": {lr, epochs or steps, weight_decay, and the effective
    lr / weight_decay}, "heldout": {tag: score or None}, "failed": {tag: why}}."""
    finetuner.folder.mkdir(parents=True, exist_ok=True)
    candidates = grid(finetuner.protocol)

    def run(candidate: Candidate) -> dict:
        try:
            model = finetuner.train(candidate, train, candidate.tag)
        except Diverged as why:
            (finetuner.folder / f"{candidate.tag}.pt").unlink(missing_ok=True)
            return {"heldout": None, "failed": f"diverged: {why}", **candidate.as_dict()}
        return {"heldout": finetuner.score(model, heldout), **candidate.as_dict()}

    on_heldout, failed = {}, {}
    for candidate in candidates:
        record = finetuner.evaluated(candidate.tag, lambda c=candidate: run(c))
        on_heldout[candidate.tag] = record["heldout"]
        if record.get("failed"):
            failed[candidate.tag] = record["failed"]
            log.warning(
                "finetune: %s failed (%s); the search goes on", candidate.tag, record["failed"]
            )
        else:
            log.info("finetune: %s -> held-out %.2f", candidate.tag, record["heldout"])
    finite = [c for c in candidates if on_heldout[c.tag] is not None]
    if not finite:
        raise UserError(
            f"fine-tuning diverged for every candidate of the grid ({len(candidates)}: first "
            f"{candidates[0].tag}, {failed[candidates[0].tag]}); lower "
            f"finetune.lr_grid"
        )
    best = max(finite, key=lambda c: (on_heldout[c.tag], -candidates.index(c)))

    def final() -> dict:
        if refit is not None:
            try:
                model = finetuner.train(best, refit, "refit_" + best.tag)
            except Diverged as why:
                raise UserError(
                    f"fine-tuning the chosen candidate {best.tag} on train + validation diverged "
                    f"({why}); "
                    "lower finetune.lr_grid"
                ) from None
        else:  # the selection's own network, from its last checkpoint
            model = finetuner.train(best, train, best.tag)
        outputs, targets = finetuner.predict(model, test)
        return {
            "test": finetuner.metric(outputs, targets),
            **best.as_dict(),
            "test_metrics": {
                name: metric(outputs, targets) for name, metric in finetuner.test_metrics.items()
            },
        }

    result = finetuner.evaluated("final", final)
    if finetuner.save:  # the chosen network's checkpoint stays; the others are no longer needed
        for candidate in candidates:
            if candidate != best:
                (finetuner.folder / f"{candidate.tag}.pt").unlink(missing_ok=True)
    lr, weight_decay = best.effective(finetuner.protocol)
    return {
        "test": result["test"],
        "test_metrics": result.get("test_metrics", {}),
        "chosen": {**best.as_dict(), "effective_lr": lr, "effective_weight_decay": weight_decay},
        "heldout": on_heldout,
        "failed": failed,
    }
