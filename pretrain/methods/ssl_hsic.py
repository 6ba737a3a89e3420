"""SSL-HSIC (Li et al., NeurIPS 2021) as a method on pretrain.engine.Engine: its networks, EMA
target, loss, step and checkpoint content.

Per step, for images x with views x1, x2 (with-target variant, M = 4):
    online:  p1 = g(h(f(x1))), p2 = g(h(f(x2)))        f backbone, h projector, g predictor
    target:  t1 = h'(f'(x1)), t2 = h'(f'(x2))           EMA of (f, h), no gradient
    loss = SSLHSICLoss([p1, p2, t2, t1]) over the all-gathered global batch
           = (1/K) sum_k [gamma * sqrt(HSIC_xx^(k)) - HSIC_xy^(k)]   (K random-feature draws; pretrain/hsic.py)
The no-target variant uses the online projections [h(f(x1)), h(f(x2))] (M = 2), with no predictor and no EMA
target. The kernel bandwidth is stepped by its own Adam on the bandwidth objective. The exported
network is a zero-debiased EMA (ema.eval_tau) of the online network, with the online network's
BatchNorm statistics.

Across processes, as the official code on many devices: every rank draws its own random features and
bandwidth pairs (seeded by seed, step and rank) for the gathered batch, the gradients are averaged
(DDP; the bandwidth's by an all-reduce), and BatchNorm runs over the global batch in the online and
the target networks. W processes
thus follow one process with loss.draws = W. An online linear probe on the detached features of view 1 trains
alongside (model.online_probe), as in the official code; it does not touch the backbone's gradient.

Resuming ends with the same weights as an uninterrupted run: data order and augmentations are
functions of (seed, epoch, index) (the batched path: of (seed, step, place in the global batch)),
the random features of (seed, step, draw), all through common.seeds.derive_seed. The checkpoint's
content: pretrain/checkpoint.py."""

from __future__ import annotations

import copy
import logging
import math
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from common.distributed import (
    check_global_batch,
    detect,
    init_distributed,
    match_threads_to_allocation,
)
from common.errors import UserError
from common.records import file_record
from common.rundir import pick_device
from common.schedule import warmup_cosine
from common.seeds import derive_seed
from pretrain import checkpoint
from pretrain.augment import TwoCrops
from pretrain.augment import TwoViews as TwoViewTransform
from pretrain.batch_augment import BatchPhotometric
from pretrain.data import Augmented, EpochBatchSampler, build_dataset, collate_views
from pretrain.ema import debiased_ema_update_, ema_update_, target_tau
from pretrain.hsic import NonFiniteFeatures, SSLHSICLoss, draw_generators
from pretrain.networks import Encoder, OnlineNetwork, effective_rank
from pretrain.optim import build_optimizer
from pretrain.sync_batchnorm import convert_sync_batchnorm

log = logging.getLogger("pretrain")


def draws_per_rank(loss, world_size: int) -> int:
    """Each rank's random-feature draws per step: loss.draws, or loss.total_draws / world_size when
    total_draws
    is set (the official code: one draw per device, so the draws of a step are the devices' count).
    """
    if not loss.total_draws:
        return loss.draws
    if loss.total_draws % world_size:
        raise UserError(
            f"loss.total_draws={loss.total_draws} does not divide among the {world_size} "
            f"processes; "
            f"choose a multiple of {world_size} (or 0 to use loss.draws per process)"
        )
    return loss.total_draws // world_size


class TrainingDiverged(UserError):
    """The loss or the features became NaN / inf."""


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor across processes (rank order); gradients flow back to every rank's
    slice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return torch.cat(dist_fn.all_gather(tensor))


class OnlineOnBothViews(nn.Module):
    """Runs the online network on both views in one module call, so DDP sees one forward per
    backward."""

    def __init__(self, online: nn.Module):
        super().__init__()
        self.online = online

    def forward(self, view1: torch.Tensor, view2: torch.Tensor):
        """(features, projection, prediction) of each view, and the online probe's logits for view 1
        (None
        without a probe), inside the one module call so that DDP averages the probe's gradient too.
        """
        first, second = self.online(view1), self.online(view2)
        # any online module; OnlineNetwork may carry one
        probe = getattr(self.online, "probe", None)
        return first, second, probe(first[0].detach()) if probe is not None else None


class SSLHSIC:
    """Builds everything from a config, validating all user input before the run dir is touched."""

    name, log = "pretrain", log
    # Keys a resumed run may change without changing its trajectory.
    may_change = {
        "run_dir",
        "data.num_workers",
        "train.log_every",
        "train.checkpoint_every",
        "train.rankme_every",
        "optim.max_steps",
        "device",
    }
    checkpoint_file, previous_file, label = "last.pt", "previous.pt", ""
    done_when_metrics_exist = False

    def __init__(self, config: DictConfig, run_dir: Path):

        self.config = config  # its values were checked when it loaded (common.checks)
        self.checkpoint_path = run_dir / "checkpoints" / self.checkpoint_file
        self.dataset = build_dataset(
            config.data.dataset, config.data.root, config.data.split, config.data.limit
        )
        batch = config.optim.batch_size
        self.steps_per_epoch = len(self.dataset) // batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the dataset has {len(self.dataset)} images, fewer than one batch of {batch}; "
                "lower optim.batch_size or add data"
            )

        world = detect().world_size  # from the environment, before joining the other processes
        check_global_batch("optim.batch_size", batch, world)
        self.local_batch = batch // world
        self.draws_per_rank = draws_per_rank(config.loss, world)
        self.dist = init_distributed()
        match_threads_to_allocation()
        self.device = pick_device(config.device)
        torch.manual_seed(derive_seed(config.seed, "pretrain.init"))
        if config.train.deterministic:
            if self.device.type == "cuda":
                # cuBLAS is deterministic only with a fixed workspace, set before its use; a few ops
                # (the probe's NLLLoss) have no deterministic CUDA kernel: warned
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True, warn_only=True)
            else:
                torch.use_deterministic_algorithms(True)

        m = config.model
        classes = len(getattr(self.dataset, "classes", ())) if m.online_probe else 0
        self.online = OnlineNetwork(
            m.backbone,
            m.projector_hidden,
            m.embedding_dim,
            m.predictor_hidden,
            use_predictor=m.use_target,
            zero_init_residual=m.zero_init_residual,
            num_classes=classes,
            probe_seed=derive_seed(config.seed, "pretrain.init"),
        ).to(self.device)
        self.target: Encoder | None = copy.deepcopy(self.online.encoder) if m.use_target else None
        self.ema = copy.deepcopy(self.online)  # the exported network
        if self.dist.is_distributed and m.sync_bn:  # the target too: the official code syncs both
            self.online = convert_sync_batchnorm(self.online, self.device)
            self.target = (
                convert_sync_batchnorm(self.target, self.device)
                if self.target is not None
                else None
            )
        for frozen in filter(None, (self.target, self.ema)):
            frozen.requires_grad_(False)
        # (correct, seen) since the last log
        self._probe_window = torch.zeros(2, dtype=torch.float64)
        cuda = self.device.type == "cuda"
        cpu_amp = self._cpu_amp()
        self.memory_format = (
            torch.channels_last
            if (cuda and config.train.channels_last) or cpu_amp
            else torch.contiguous_format
        )
        if self.memory_format == torch.channels_last:
            for module in filter(None, (self.online, self.target, self.ema)):
                module.to(memory_format=torch.channels_last)
        self.photometric = None
        if config.augment.batched:
            self.photometric = nn.ModuleList(
                BatchPhotometric(config.augment, config.data.image_size, view) for view in (0, 1)
            ).to(self.device)
        self.forward_views: nn.Module = OnlineOnBothViews(self.online)
        if self.dist.is_distributed:
            self.forward_views = nn.parallel.DistributedDataParallel(
                self.forward_views, device_ids=[self.device.index] if cuda else None
            )
        if config.train.compile:
            self.forward_views = torch.compile(self.forward_views)

        o = config.optim
        self.peak_lr = o.base_lr * o.batch_size / 256
        self.optimizer = build_optimizer(
            self.online, o.name, self.peak_lr, o.weight_decay, o.momentum, o.eta
        )
        self.loss_fn = SSLHSICLoss.from_config(config.loss).to(self.device)
        self.scale_optimizer = torch.optim.Adam(self.loss_fn.parameters(), lr=config.loss.scale_lr)
        # as the official config: int(epochs * N // B) (312,784 for 1000 epochs of ImageNet at
        # 4096), so the last epoch may end mid-way
        self.total_steps = int(o.epochs * len(self.dataset) // batch)
        self.warmup_steps = int(o.warmup_epochs * len(self.dataset) // batch)
        self.stop_step = min(self.total_steps, o.max_steps) if o.max_steps else self.total_steps
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if (cuda and config.train.amp) or cpu_amp
            else nullcontext()
        )

    def _cpu_amp(self) -> bool:
        """bf16 on the CPU: asked for, and the CPU has native bf16 (otherwise it is emulated, and
        slower)."""
        if self.device.type != "cpu" or not self.config.train.cpu_amp:
            return False
        if self.config.train.deterministic:
            raise UserError(
                "train.deterministic=true and train.cpu_amp=true exclude each other: oneDNN's bf16 "
                "kernels are not bitwise reproducible; set train.cpu_amp=false"
            )
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            log.warning(
                "train.cpu_amp is set but this CPU has no native bf16 (avx512_bf16 or AMX): "
                "training in fp32"
            )
            return False
        return True

    # -------------------------------------------------------------------------------- checkpoints

    def state_dict(self, step: int, elapsed_s: float) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": checkpoint.FORMAT,
            "version": checkpoint.VERSION,
            "step": step,
            "elapsed_s": elapsed_s,
            "config": OmegaConf.to_yaml(self.config, resolve=True),
            "backbone": self.config.model.backbone,
            "online": self.online.state_dict(),
            "target": self.target.state_dict() if self.target else None,
            "ema": self.ema.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scale_optimizer": self.scale_optimizer.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> tuple[int, float]:
        self.online.load_state_dict(state["online"])
        if self.target is not None:
            self.target.load_state_dict(state["target"])
        self.ema.load_state_dict(state["ema"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scale_optimizer.load_state_dict(state["scale_optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        return state["step"], state.get("elapsed_s", 0.0)

    @staticmethod
    def read_checkpoint(path: Path) -> dict:
        return checkpoint.load(path)

    # -------------------------------------------------------------------------------------- steps

    def loader(self, epoch: int, start_batch: int):
        c = self.config
        transform = (TwoCrops if c.augment.batched else TwoViewTransform)(
            c.augment, c.data.image_size
        )
        dataset = Augmented(self.dataset, transform, c.seed)
        sampler = EpochBatchSampler(
            len(self.dataset),
            c.optim.batch_size,
            c.seed,
            epoch,
            start_batch,
            self.dist.rank,
            self.dist.world_size,
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=c.data.num_workers,
            collate_fn=collate_views,
            pin_memory=self.device.type == "cuda",
        )

    def views(self, batch: dict, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(view 1, view 2, labels) on the device. The batched photometric draws are those of the
        whole global
        batch, sliced at this rank's place, so that a view does not depend on the number of
        processes."""
        views = [batch[k].to(self.device, non_blocking=True) for k in ("view1", "view2")]
        # the colour, blur and solarize steps, batch-wise on the device
        if self.photometric is not None:
            draws = torch.Generator().manual_seed(
                derive_seed(self.config.seed, "pretrain.photometric", step)
            )
            place = dict(
                offset=self.dist.rank * self.local_batch, total=self.config.optim.batch_size
            )
            views = [
                augment(view, draws, **place) for augment, view in zip(self.photometric, views)
            ]
        views = [view.contiguous(memory_format=self.memory_format) for view in views]
        return views[0], views[1], batch["labels"].to(self.device, non_blocking=True)

    def images(self, batch: dict) -> int:
        return batch["view1"].shape[0] * self.dist.world_size

    def train_step(self, batch: dict, step: int) -> dict[str, float] | None:
        if batch["view1"] is None:  # every image of this batch was unreadable (and skipped)
            return None
        return self.update(*self.views(batch, step), step=step)

    def hiddens(
        self, view1: torch.Tensor, view2: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """The M views the loss sees, gathered over processes; the local backbone features of view 1
        and the
        probe's logits for them (None without a probe)."""
        with self.autocast:
            (f1, z1, p1), (_, z2, p2), logits = self.forward_views(view1, view2)
            if self.target is None:
                return [gather(z1), gather(z2)], f1, logits
            with torch.no_grad():
                _, t1 = self.target(view1)
                _, t2 = self.target(view2)
        return [gather(p1), gather(p2), gather(t2), gather(t1)], f1, logits

    def update(
        self,
        view1: torch.Tensor,
        view2: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        step: int,
    ) -> dict[str, float]:
        """One optimisation step (number `step`, from 0) on a pair of views."""
        lr = warmup_cosine(step, self.total_steps, self.warmup_steps, self.peak_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        hiddens, features, logits = self.hiddens(view1, view2)
        draws = self.draws_per_rank  # this rank's draws: rank * draws .. (rank + 1) * draws - 1
        generators = draw_generators(self.config.seed, step, self.dist.rank * draws, draws)
        try:  # the loss checks its inputs once; a non-finite embedding means the run diverged
            loss, stats = self.loss_fn(hiddens, generators)
        except NonFiniteFeatures:
            self._diverged("the embeddings", step)
        if not math.isfinite(stats["loss"]):
            self._diverged("the loss", step)
        bandwidth_loss = self.loss_fn.bandwidth_loss(hiddens, generators)
        total = loss
        if logits is not None:
            if labels is None:
                raise ValueError(
                    "the online probe needs the batch's labels: train_step(view1, view2, labels)"
                )
            probe_loss = nn.functional.cross_entropy(logits.float(), labels)
            total = loss + probe_loss
            with torch.no_grad():
                correct = (logits.argmax(1) == labels).sum().item()
            self._probe_window += torch.tensor([correct, len(labels)], dtype=torch.float64)
            stats["probe_loss"] = probe_loss.item()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scale_optimizer.zero_grad(set_to_none=True)
        bandwidth_loss.backward()
        # every rank drew its own pairs: average, so that all keep one bandwidth
        if self.dist.is_distributed:
            grad = self.loss_fn.scale.grad
            torch.distributed.all_reduce(grad)
            grad.div_(self.dist.world_size)
        self.scale_optimizer.step()
        tau = target_tau(step, self.total_steps, self.config.ema.target_tau)
        if self.target is not None:
            ema_update_(self.target, self.online.encoder, tau, buffers=False)
        # the EMA started as a copy of the initial network (its first update), so this is update
        # step + 2
        debiased_ema_update_(self.ema, self.online, self.config.ema.eval_tau, step + 2)
        stats.update(lr=lr, tau=tau)
        every = self.config.train.rankme_every
        # on the step that ends at a multiple, so that it gets logged
        if every and (step + 1) % every == 0:
            stats["rankme"] = effective_rank(features)
        return stats

    def _diverged(self, what: str, step: int) -> None:
        kept = (
            f"the last good checkpoint ({self.checkpoint_path}) is kept"
            if self.checkpoint_path.exists()
            else "no checkpoint had been written yet"
        )
        raise TrainingDiverged(
            f"{what} became NaN or inf at step {step}; {kept}; lower optim.base_lr or "
            "check the data, then rerun to resume"
        )

    # ------------------------------------------------------------------------------ engine's hooks

    def log_due(self, step: int) -> bool:
        return step % self.config.train.log_every == 0 or step == self.stop_step

    def checkpoint_due(self, step: int) -> bool:
        return step % self.config.train.checkpoint_every == 0

    def complete(self, step: int) -> bool:
        return step >= self.total_steps

    def log_stats(self, stats: dict[str, float], step: int) -> dict[str, float]:
        return {**stats, **self._probe_accuracy()}

    def _probe_accuracy(self) -> dict[str, float]:
        """The online probe's top-1 over the global batches since the last log (on the training
        views); resets."""
        if self.online.probe is None:
            return {}
        window = self._probe_window.clone()
        if self.dist.is_distributed:
            window = window.to(self.device)
            torch.distributed.all_reduce(window)
        self._probe_window.zero_()
        correct, seen = window.tolist()
        return {"probe_top1": correct / seen} if seen else {}

    def export(self, run_dir: Path) -> None:
        """Nothing beside checkpoints/last.pt: transfer reads its networks
        (pretrain/checkpoint.py)."""

    def metrics(self, stats: dict[str, float], skipped: int, step: int) -> dict:
        c = self.config
        final = {
            k: stats[k]
            for k in ("loss", "hsic_xy", "hsic_xx", "scale", "images_per_s", "probe_top1")
            if k in stats
        }
        return dict(
            task="pretrain",
            dataset=c.data.dataset,
            backbone=file_record(self.checkpoint_path),
            protocol="ssl-hsic" if c.model.use_target else "ssl-hsic-no-target",
            metrics=final,
            extra={"steps": step, "skipped_images": skipped},
        )
