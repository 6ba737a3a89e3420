"""The SSL-HSIC training loop: one run directory, resumable, single process or DDP.

Per step, for images x with views x1, x2 (with-target variant, M = 4):
    online:  p1 = g(h(f(x1))), p2 = g(h(f(x2)))        f backbone, h projector, g predictor
    target:  t1 = h'(f'(x1)), t2 = h'(f'(x2))           EMA of (f, h), no gradient
    loss = SSLHSICLoss([p1, p2, t2, t1]) over the all-gathered global batch
The no-target variant uses the online projections [h(f(x1)), h(f(x2))] (M = 2), with no predictor and no EMA
target. The kernel bandwidth is stepped by its own Adam on the bandwidth objective. The exported network
is a zero-debiased EMA (ema.eval_tau) of the online network, with the online network's BatchNorm statistics.

Across processes, as the official code on many devices: every rank draws its own random features and bandwidth
pairs (seeded by seed, step and rank) for the gathered batch, the gradients are averaged (DDP; the bandwidth's
by an all-reduce), and BatchNorm runs over the global batch in the online and the target networks. W processes
thus follow one process with loss.draws = W. An online linear probe on the detached features of view 1 trains
alongside (model.online_probe), as in the official code; it does not touch the backbone's gradient.

Run directory: config.yaml, checkpoints/last.pt (atomic), events (TensorBoard), history.jsonl, log.txt,
metrics.json. Rerunning resumes from checkpoints/last.pt and ends with the same weights as an uninterrupted
run: data order and augmentations are functions of (seed, epoch, index) (the batched path: of (seed, step, place in
the global batch)), the random features of (seed, step, draw).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pretrain import checkpoint
from common.config import config_differences
from common.errors import UserError
from common.files import remove_partial_writes
from common.rundir import (RunDirLock, attach_log, detach_log, pick_device, refuse_other_config,
                             start_run_dir)

log = logging.getLogger("pretrain")
# Keys a resumed run may change without changing its trajectory.
RESUMABLE_CHANGES = {"run_dir", "data.num_workers", "train.log_every", "train.checkpoint_every",
                     "train.rankme_every", "optim.max_steps", "device"}


def draws_per_rank(loss, world_size: int) -> int:
    """Each rank's random-feature draws per step: loss.draws, or loss.total_draws / world_size when total_draws
    is set (the official code: one draw per device, so the draws of a step are the devices' count)."""
    if not loss.total_draws:
        return loss.draws
    if loss.total_draws % world_size:
        raise UserError(f"loss.total_draws={loss.total_draws} does not divide among the {world_size} processes; "
                        f"choose a multiple of {world_size} (or 0 to use loss.draws per process)")
    return loss.total_draws // world_size


class TrainingDiverged(UserError):
    """The loss or the features became NaN / inf."""


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor across processes (rank order); gradients flow back to every rank's slice."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    import torch.distributed.nn.functional as dist_fn
    return torch.cat(dist_fn.all_gather(tensor))


class TwoViews(nn.Module):
    """Runs the online network on both views in one module call, so DDP sees one forward per backward."""

    def __init__(self, online: nn.Module):
        super().__init__()
        self.online = online

    def forward(self, view1: torch.Tensor, view2: torch.Tensor):
        """(features, projection, prediction) of each view, and the online probe's logits for view 1 (None
        without a probe), inside the one module call so that DDP averages the probe's gradient too."""
        first, second = self.online(view1), self.online(view2)
        probe = getattr(self.online, "probe", None)  # any online module; OnlineNetwork may carry one
        return first, second, probe(first[0].detach()) if probe is not None else None


class Pretrainer:
    """Builds everything from a config, validating all user input before the run dir is touched."""

    def __init__(self, config: DictConfig):
        from pretrain.data import build_dataset
        from pretrain.hsic import SSLHSICLoss
        from common.distributed import check_global_batch, detect, init_distributed, match_threads_to_allocation
        from pretrain.networks import Encoder, OnlineNetwork

        self.config = config  # its values were checked when it loaded (common.checks)
        self.run_dir = Path(config.run_dir)
        self.checkpoint_path = self.run_dir / "checkpoints" / "last.pt"
        self.previous_path = self.checkpoint_path.with_name("previous.pt")
        self._lock: RunDirLock | None = None
        self._fallback_note: str | None = None  # why resuming takes previous.pt, logged once the log is open
        self._stop_asked_at: float | None = None
        self._stop_budget_s: float | None = None
        self.resume_state = self._check_run_dir()
        self.dataset = build_dataset(config.data.dataset, config.data.root, config.data.split, config.data.limit)
        batch = config.optim.batch_size
        self.steps_per_epoch = len(self.dataset) // batch
        if self.steps_per_epoch == 0:
            raise UserError(f"the dataset has {len(self.dataset)} images, fewer than one batch of {batch}; "
                            "lower optim.batch_size or add data")

        world = detect().world_size  # from the environment, before joining the other processes
        check_global_batch("optim.batch_size", batch, world)
        self.local_batch = batch // world
        self.draws_per_rank = draws_per_rank(config.loss, world)
        self.dist = init_distributed()
        match_threads_to_allocation()
        self.is_main = self.dist.rank == 0
        self.device = pick_device(config.device)
        torch.manual_seed(config.seed)
        if config.train.deterministic:
            if self.device.type == "cuda":  # cuBLAS is deterministic only with a fixed workspace, set before its use;
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # a few ops (the probe's NLLLoss) have
                torch.use_deterministic_algorithms(True, warn_only=True)     # no deterministic CUDA kernel: warned
            else:
                torch.use_deterministic_algorithms(True)

        m = config.model
        classes = len(getattr(self.dataset, "classes", ())) if m.online_probe else 0
        self.online = OnlineNetwork(m.backbone, m.projector_hidden, m.embedding_dim, m.predictor_hidden,
                                    use_predictor=m.use_target, zero_init_residual=m.zero_init_residual,
                                    num_classes=classes, probe_seed=config.seed).to(self.device)
        self.target: Encoder | None = copy.deepcopy(self.online.encoder) if m.use_target else None
        self.ema = copy.deepcopy(self.online)  # the exported network
        if self.dist.is_distributed and m.sync_bn:  # the target too: the official code syncs both
            from pretrain.sync_batchnorm import convert_sync_batchnorm
            self.online = convert_sync_batchnorm(self.online, self.device)
            self.target = convert_sync_batchnorm(self.target, self.device) if self.target is not None else None
        for frozen in filter(None, (self.target, self.ema)):
            frozen.requires_grad_(False)
        self._probe_window = torch.zeros(2, dtype=torch.float64)  # (correct, seen) since the last log
        cuda = self.device.type == "cuda"
        cpu_amp = self._cpu_amp()
        self.memory_format = torch.channels_last if (cuda and config.train.channels_last) or cpu_amp \
            else torch.contiguous_format
        if self.memory_format == torch.channels_last:
            for module in filter(None, (self.online, self.target, self.ema)):
                module.to(memory_format=torch.channels_last)
        self.photometric = None
        if config.augment.batched:
            from pretrain.batch_augment import BatchPhotometric
            self.photometric = nn.ModuleList(BatchPhotometric(config.augment, config.data.image_size, view)
                                             for view in (0, 1)).to(self.device)
        self.forward_views: nn.Module = TwoViews(self.online)
        if self.dist.is_distributed:
            self.forward_views = nn.parallel.DistributedDataParallel(
                self.forward_views, device_ids=[self.device.index] if cuda else None)
        if config.train.compile:
            self.forward_views = torch.compile(self.forward_views)

        o = config.optim
        from pretrain.optim import build_optimizer
        self.peak_lr = o.base_lr * o.batch_size / 256
        self.optimizer = build_optimizer(self.online, o.name, self.peak_lr, o.weight_decay, o.momentum, o.eta)
        lc = config.loss
        self.loss_fn = SSLHSICLoss(lc.num_features, lc.gamma, lc.kernel, lc.estimator, lc.init_scale).to(self.device)
        self.scale_optimizer = torch.optim.Adam(self.loss_fn.parameters(), lr=lc.scale_lr)
        # as the official config: int(epochs * N // B) (312,784 for 1000 epochs of ImageNet at 4096), so the
        # last epoch may end mid-way
        self.total_steps = int(o.epochs * len(self.dataset) // batch)
        self.warmup_steps = int(o.warmup_epochs * len(self.dataset) // batch)
        self.stop_step = min(self.total_steps, o.max_steps) if o.max_steps else self.total_steps
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if (cuda and config.train.amp) or cpu_amp else nullcontext())
        self.step = 0
        self.stop_requested = False
        self._after_stop = None
        self._elapsed_before, self._started = 0.0, time.time()

    def _cpu_amp(self) -> bool:
        """bf16 on the CPU: asked for, and the CPU has native bf16 (otherwise it is emulated, and slower)."""
        if self.device.type != "cpu" or not self.config.train.cpu_amp:
            return False
        if self.config.train.deterministic:
            raise UserError("train.deterministic=true and train.cpu_amp=true exclude each other: oneDNN's bf16 "
                            "kernels are not bitwise reproducible; set train.cpu_amp=false")
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            log.warning("train.cpu_amp is set but this CPU has no native bf16 (avx512_bf16 or AMX): training in fp32")
            return False
        return True

    def elapsed(self) -> float:
        """Seconds of training over all runs of this run dir (resumes included)."""
        return self._elapsed_before + time.time() - self._started

    # ------------------------------------------------------------------------------------ run dir

    def _check_run_dir(self) -> dict | None:
        """Refuse a run dir of another config; load its checkpoint for resuming (or None for a new run)."""
        refuse_other_config(self.run_dir, self.config, RESUMABLE_CHANGES)
        self._stamp_at_start = self._checkpoint_stamp()
        state = self._latest_readable_checkpoint()
        if state is None:
            return None
        current = OmegaConf.to_container(self.config, resolve=True)
        differences = config_differences(OmegaConf.to_container(OmegaConf.create(state["config"])), current,
                                         RESUMABLE_CHANGES)
        if differences:
            raise UserError(f"checkpoint {self.checkpoint_path} comes from another config (differs at "
                            f"{', '.join(differences[:5])}); choose another run_dir")
        return state

    def _latest_readable_checkpoint(self) -> dict | None:
        """last.pt; or previous.pt when last.pt is unreadable (a truncated file); None for a new run."""
        if not self.checkpoint_path.exists():
            return checkpoint.load(self.previous_path) if self.previous_path.exists() else None
        try:
            return checkpoint.load(self.checkpoint_path)
        except UserError as error:
            if not self.previous_path.exists():
                raise
            state = checkpoint.load(self.previous_path)
            self._fallback_note = f"{error}; resuming from {self.previous_path} (step {state['step']}) instead"
            return state

    def _setup_outputs(self) -> None:
        if not self.is_main:
            return
        start_run_dir(self.run_dir, self.config)
        self._handlers = [attach_log(log, self.run_dir)]
        if self._lock is not None:
            self._lock.log_takeover(log)
        remove_partial_writes(self.checkpoint_path.parent, log)
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(self.run_dir / "events"), purge_step=self.step or None)
        history = self.run_dir / "history.jsonl"
        if history.exists():  # drop what was logged after the checkpoint we resume from
            kept = [line for line in history.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            history.write_text("".join(line + "\n" for line in kept))
        self.history = open(history, "a")

    # -------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": self.step, "elapsed_s": self.elapsed(),
                "config": OmegaConf.to_yaml(self.config, resolve=True), "backbone": self.config.model.backbone,
                "online": self.online.state_dict(), "target": self.target.state_dict() if self.target else None,
                "ema": self.ema.state_dict(), "loss": self.loss_fn.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scale_optimizer": self.scale_optimizer.state_dict(),
                "rng": rng}

    def load_state_dict(self, state: dict) -> None:
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
        self.step = state["step"]
        self._elapsed_before = state.get("elapsed_s", 0.0)

    def save_checkpoint(self) -> None:
        """checkpoints/last.pt, written atomically; the one it replaces is kept as previous.pt (a hard link), so a
        crash at any point leaves a loadable checkpoint. A failed write stops the run and keeps both."""
        from common.files import atomic_torch_save
        if self.is_main:
            try:
                if self.checkpoint_path.exists():
                    link = self.previous_path.with_name(".previous.pt.link")
                    link.unlink(missing_ok=True)
                    os.link(self.checkpoint_path, link)
                    os.replace(link, self.previous_path)
                atomic_torch_save(self.state_dict(), self.checkpoint_path)
            except OSError as error:
                raise UserError(f"cannot write checkpoint {self.checkpoint_path}: {error.strerror or error}; the "
                                f"last good checkpoint is kept; fix that (e.g. free disk space) and rerun to resume") \
                    from None
            log.info("step %d: checkpoint %s", self.step, self.checkpoint_path)
        if self.dist.is_distributed:
            torch.distributed.barrier()

    # -------------------------------------------------------------------------------------- steps

    def _loader(self, epoch: int, start_batch: int):
        from torch.utils.data import DataLoader
        from pretrain.augment import TwoCrops
        from pretrain.augment import TwoViews as TwoViewTransform
        from pretrain.data import Augmented, EpochBatchSampler, collate_views
        c = self.config
        transform = (TwoCrops if c.augment.batched else TwoViewTransform)(c.augment, c.data.image_size)
        dataset = Augmented(self.dataset, transform, c.seed)
        sampler = EpochBatchSampler(len(self.dataset), c.optim.batch_size, c.seed, epoch, start_batch,
                                    self.dist.rank, self.dist.world_size)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=c.data.num_workers,
                          collate_fn=collate_views, pin_memory=self.device.type == "cuda")

    def _views(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(view 1, view 2, labels) on the device. The batched photometric draws are those of the whole global
        batch, sliced at this rank's place, so that a view does not depend on the number of processes."""
        views = [batch[k].to(self.device, non_blocking=True) for k in ("view1", "view2")]
        if self.photometric is not None:  # the colour, blur and solarize steps, batch-wise on the device
            draws = torch.Generator().manual_seed((self.config.seed * 1_000_003 + self.step) * 1009)
            place = dict(offset=self.dist.rank * self.local_batch, total=self.config.optim.batch_size)
            views = [augment(view, draws, **place) for augment, view in zip(self.photometric, views)]
        views = [view.contiguous(memory_format=self.memory_format) for view in views]
        return views[0], views[1], batch["labels"].to(self.device, non_blocking=True)

    def hiddens(self, view1: torch.Tensor, view2: torch.Tensor
                ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """The M views the loss sees, gathered over processes; the local backbone features of view 1 and the
        probe's logits for them (None without a probe)."""
        with self.autocast:
            (f1, z1, p1), (_, z2, p2), logits = self.forward_views(view1, view2)
            if self.target is None:
                return [gather(z1), gather(z2)], f1, logits
            with torch.no_grad():
                _, t1 = self.target(view1)
                _, t2 = self.target(view2)
        return [gather(p1), gather(p2), gather(t2), gather(t1)], f1, logits

    def train_step(self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor | None = None
                   ) -> dict[str, float]:
        from pretrain.ema import debiased_ema_update_, ema_update_, target_tau
        from pretrain.hsic import NonFiniteFeatures, draw_generators
        from pretrain.networks import effective_rank
        from common.schedule import warmup_cosine
        lr = warmup_cosine(self.step, self.total_steps, self.warmup_steps, self.peak_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        hiddens, features, logits = self.hiddens(view1, view2)
        draws = self.draws_per_rank  # this rank's draws: rank * draws .. (rank + 1) * draws - 1
        generators = draw_generators(self.config.seed, self.step, self.dist.rank * draws, draws)
        try:  # the loss checks its inputs once; a non-finite embedding means the run diverged
            loss, stats = self.loss_fn(hiddens, generators)
        except NonFiniteFeatures:
            self._diverged("the embeddings")
        if not math.isfinite(stats["loss"]):
            self._diverged("the loss")
        bandwidth_loss = self.loss_fn.bandwidth_loss(hiddens, generators)
        total = loss
        if logits is not None:
            if labels is None:
                raise ValueError("the online probe needs the batch's labels: train_step(view1, view2, labels)")
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
        if self.dist.is_distributed:  # every rank drew its own pairs: average, so that all keep one bandwidth
            grad = self.loss_fn.scale.grad
            torch.distributed.all_reduce(grad)
            grad.div_(self.dist.world_size)
        self.scale_optimizer.step()
        tau = target_tau(self.step, self.total_steps, self.config.ema.target_tau)
        if self.target is not None:
            ema_update_(self.target, self.online.encoder, tau, buffers=False)
        # the EMA started as a copy of the initial network (its first update), so this is update step + 2
        debiased_ema_update_(self.ema, self.online, self.config.ema.eval_tau, self.step + 2)
        stats.update(lr=lr, tau=tau)
        every = self.config.train.rankme_every
        if every and (self.step + 1) % every == 0:  # on the step that ends at a multiple, so that it gets logged
            stats["rankme"] = effective_rank(features)
        self.step += 1
        return stats

    def _diverged(self, what: str) -> None:
        kept = f"the last good checkpoint ({self.checkpoint_path}) is kept" if self.checkpoint_path.exists() \
            else "no checkpoint had been written yet"
        raise TrainingDiverged(f"{what} became NaN or inf at step {self.step}; {kept}; lower optim.base_lr or "
                               "check the data, then rerun to resume")

    # ---------------------------------------------------------------------------------------- run

    def _request_stop(self, signum, frame) -> None:
        log.info("signal %d: checkpointing after this step", signum)
        self.stop_requested = True
        self._stop_asked_at = time.monotonic()

    def request_stop(self, then=None, budget_s: float | None = None) -> None:
        """Stop at the next step boundary, write a checkpoint, then call `then` (e.g. submitit's requeue).

        `budget_s` is the time left before the job is killed (SLURM's signal delay): the time from this call to
        the written checkpoint is logged, with a warning when it takes more than half of the budget."""
        self.stop_requested = True
        self._after_stop = then
        self._stop_asked_at, self._stop_budget_s = time.monotonic(), budget_s

    def _report_stop_latency(self) -> None:
        if self._stop_asked_at is None or not self.is_main:
            return
        took, budget = time.monotonic() - self._stop_asked_at, self._stop_budget_s
        log.info("stop signal -> checkpoint written in %.1f s%s", took, f" (budget {budget:.0f} s)" if budget else "")
        if budget and took > budget / 2:
            log.warning("the checkpoint after the stop signal took %.1f s, more than half of the %.0f s before the "
                        "job is killed: raise the executor's signal_delay_s, or checkpoint more often", took, budget)

    def run(self) -> dict[str, Any]:
        """Train to the end of the schedule (or optim.max_steps); return the last logged stats."""
        lock = self._lock = RunDirLock(self.run_dir).acquire() if self.is_main else None
        try:
            if lock is not None:
                self._refuse_a_moved_checkpoint()
            return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _refuse_a_moved_checkpoint(self) -> None:
        """Between reading the checkpoint and taking the lock, another writer may have moved the run on."""
        if self._checkpoint_stamp() != self._stamp_at_start:
            raise UserError(f"run dir {self.run_dir} changed while this run started: another run wrote a "
                            "checkpoint there; rerun to resume from it")

    def _checkpoint_stamp(self) -> tuple:
        """(size, mtime) of last.pt and previous.pt: tells whether another writer touched them."""
        return tuple((p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None
                     for p in (self.checkpoint_path, self.previous_path))

    def _run(self) -> dict[str, Any]:
        from tqdm import tqdm
        if self.resume_state is not None:
            self.load_state_dict(self.resume_state)
            self.resume_state = None
        self._setup_outputs()
        if self.is_main and self._fallback_note:
            log.warning(self._fallback_note)
        if self.is_main:
            log.info("processes: %d, global batch %d (%d per process)", self.dist.world_size,
                     self.config.optim.batch_size, self.config.optim.batch_size // self.dist.world_size)
        if self.is_main and self.step:
            log.info("resuming %s at step %d of %d", self.run_dir, self.step, self.stop_step)
        previous = signal.signal(signal.SIGTERM, self._request_stop)
        stats, skipped = {}, 0
        window_start, window_images = time.time(), 0
        progress = tqdm(total=self.stop_step, initial=self.step, disable=not (self.is_main and sys.stderr.isatty()),
                        desc="pretrain", unit="step", dynamic_ncols=True)
        try:
            while self.step < self.stop_step and not self.stop_requested:
                epoch, start_batch = divmod(self.step, self.steps_per_epoch)
                for batch in self._loader(epoch, start_batch):
                    skipped += self._check_corrupt(batch)
                    if batch["view1"] is None:
                        self.step += 1
                        continue
                    stats = self.train_step(*self._views(batch))
                    window_images += batch["view1"].shape[0] * self.dist.world_size
                    progress.update(1)
                    progress.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
                    if self.step % self.config.train.log_every == 0 or self.step == self.stop_step:
                        stats["images_per_s"] = window_images / max(1e-9, time.time() - window_start)
                        window_start, window_images = time.time(), 0
                        stats.update(self._probe_accuracy())
                        self._log(stats, epoch)
                    if self.step % self.config.train.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self.dist.is_distributed:  # every rank stops at the same step, whoever got the signal
                        flag = torch.tensor([float(self.stop_requested)], device=self.device)
                        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                        self.stop_requested = bool(flag.item())
                    if self.step >= self.stop_step or self.stop_requested:
                        break
            self.save_checkpoint()
            if self.stop_requested:
                self._report_stop_latency()
            if self.stop_requested and self._after_stop is not None:
                self._after_stop()
        finally:
            progress.close()
            signal.signal(signal.SIGTERM, previous)
            if self.is_main:
                self.writer.close()
                self.history.close()
                for handler in self._handlers:
                    detach_log(log, handler)
        if self.is_main and self.step >= self.total_steps:
            self._write_metrics(stats, skipped)
        return stats

    def _probe_accuracy(self) -> dict[str, float]:
        """The online probe's top-1 over the global batches since the last log (on the training views); resets."""
        if self.online.probe is None:
            return {}
        window = self._probe_window.clone()
        if self.dist.is_distributed:
            window = window.to(self.device)
            torch.distributed.all_reduce(window)
        self._probe_window.zero_()
        correct, seen = window.tolist()
        return {"probe_top1": correct / seen} if seen else {}

    def _check_corrupt(self, batch: dict) -> int:
        for bad in batch["corrupt"]:
            if self.config.data.on_corrupt == "error":
                raise UserError(f"cannot read image {bad.path}: {bad.reason}; fix or remove it, or set "
                                "data.on_corrupt=skip to skip unreadable images")
            log.warning("skipped unreadable image %s (%s)", bad.path, bad.reason)
        return len(batch["corrupt"])

    def _log(self, stats: dict[str, float], epoch: int) -> None:
        if not self.is_main:
            return
        for key, value in stats.items():
            self.writer.add_scalar(f"pretrain/{key}", value, self.step)
        self.history.write(json.dumps({"step": self.step, "epoch": epoch, **stats}) + "\n")
        self.history.flush()
        log.info("step %d/%d epoch %d " + " ".join(f"{k} {v:.4g}" for k, v in stats.items()),
                 self.step, self.stop_step, epoch)

    def _write_metrics(self, stats: dict[str, float], skipped: int) -> None:
        from common.records import file_record, write_metrics
        c = self.config
        history = self.run_dir / "history.jsonl"
        if not stats and history.exists():  # resumed at the very end: report the last logged step
            lines = history.read_text().splitlines()
            stats = json.loads(lines[-1]) if lines else {}
        final = {k: stats[k] for k in ("loss", "hsic_xy", "hsic_xx", "scale", "images_per_s", "probe_top1")
                 if k in stats}
        write_metrics(self.run_dir, task="pretrain", dataset=c.data.dataset, backbone=file_record(self.checkpoint_path),
                      protocol="ssl-hsic" if c.model.use_target else "ssl-hsic-no-target", metrics=final,
                      seed=c.seed, config=OmegaConf.to_container(c, resolve=True), wall_time_s=self.elapsed(),
                      extra={"steps": self.step, "skipped_images": skipped})


def train(config: DictConfig) -> dict[str, Any]:
    from common.distributed import shutdown_distributed
    metrics = Pretrainer(config).run()
    shutdown_distributed()
    return metrics
