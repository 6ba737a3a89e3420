"""The training engine: one run directory, resumable, single process or DDP, for any method of
pretrain/methods/.

    engine = build_engine("pretrain", load_step_config("pretrain", "configs/pretrain/x.yaml", ["seed=1"]))
    stats = engine.run()

The engine owns what every method shares: the run dir (refused when it holds a run of another
config; its lock, one writer at a time; config.yaml written once), the step loop over epochs, the
checkpoint (RUN_DIR/checkpoints/, written atomically when the method asks, at the end and on a stop,
the one it replaces kept as the method's previous file; a rerun resumes from it, or from the
previous one when it is unreadable), SIGTERM and request_stop (checkpoint at the next step boundary,
then call `then`, e.g. submitit's requeue), log.txt, TensorBoard events, history.jsonl and
metrics.json. The method (SSL-HSIC, the supervised control) owns its networks, data, step and
checkpoint content; its interface: pretrain/methods/__init__.py."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from common.config import config_differences, load_config
from common.errors import UserError
from common.files import atomic_torch_save, remove_partial_writes
from common.records import write_metrics
from common.rundir import RunDirLock, attach_log, detach_log, refuse_other_config, start_run_dir
from pretrain.schema import PretrainConfig

# step -> the method's class ("module:Class"); both read the pretraining config (pretrain/schema.py)
METHODS = {
    "pretrain": "pretrain.methods.ssl_hsic:SSLHSIC",
    "supervised": "pretrain.methods.supervised:Supervised",
}


def method_class(step: str):
    if step not in METHODS:
        raise UserError(f"unknown training step '{step}'; choose one of {', '.join(METHODS)}")
    module, name = METHODS[step].split(":")
    return getattr(importlib.import_module(module), name)


def load_step_config(
    step: str, config_path: str | Path, overrides: Sequence[str] = ()
) -> DictConfig:
    """The checked config of a training step: the config file with key=value overrides applied."""
    method_class(step)  # refuse an unknown step before reading anything
    return load_config(PretrainConfig, config_path, list(overrides))


def build_engine(step: str, config: DictConfig) -> "Engine":
    """The engine of a training step ("pretrain": SSL-HSIC, "supervised": the positive control),
    built and
    checked (nothing is written before run())."""
    return Engine(method_class(step), config)


class Engine:
    """Builds the method from a config, validating all user input before the run dir is touched;
    run() trains."""

    def __init__(self, method_type: type, config: DictConfig):
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.name, self.log = method_type.name, method_type.log
        self.checkpoint_path = self.run_dir / "checkpoints" / method_type.checkpoint_file
        self.previous_path = self.checkpoint_path.with_name(method_type.previous_file)
        self._lock: RunDirLock | None = None
        # why resuming takes the previous file, logged once the log is open
        self._fallback_note: str | None = None
        self._stop_asked_at: float | None = None
        self._stop_budget_s: float | None = None
        self._after_stop = None
        self.stop_requested = False
        self.step = 0
        self._elapsed_before, self._started = 0.0, time.time()
        refuse_other_config(self.run_dir, config, method_type.may_change, method_type.label)
        # the metrics.json of a finished run that is only reported
        self.finished: dict | None = None
        if method_type.done_when_metrics_exist and (self.run_dir / "metrics.json").exists():
            self.finished = json.loads((self.run_dir / "metrics.json").read_text())
            self.method = None
            return
        self._stamp_at_start = self._checkpoint_stamp()
        self.resume_state = self._resumable_state(method_type)
        self.method = method_type(config, self.run_dir)
        self.dist = self.method.dist
        self.is_main = self.dist.rank == 0
        self.device = self.method.device

    @property
    def steps_per_epoch(self) -> int:
        return self.method.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.method.total_steps

    @property
    def stop_step(self) -> int:
        return self.method.stop_step

    def elapsed(self) -> float:
        """Seconds of training over all runs of this run dir (resumes included)."""
        return self._elapsed_before + time.time() - self._started

    # ------------------------------------------------------------------------------ run dir, resume

    def _resumable_state(self, method_type: type) -> dict | None:
        """The checkpoint to resume from (None for a new run); refused when it comes from another
        config."""
        state = self._latest_readable_checkpoint(method_type.read_checkpoint)
        if state is None or "config" not in state:
            return state
        current = OmegaConf.to_container(self.config, resolve=True)
        differences = config_differences(
            OmegaConf.to_container(OmegaConf.create(state["config"])),
            current,
            method_type.may_change,
        )
        if differences:
            raise UserError(
                f"checkpoint {self.checkpoint_path} comes from another config (differs at "
                f"{', '.join(differences[:5])}); choose another run_dir"
            )
        return state

    def _latest_readable_checkpoint(self, read) -> dict | None:
        """The checkpoint; or the previous one when it is unreadable (a truncated file); None for
        a new run."""
        if not self.checkpoint_path.exists():
            return read(self.previous_path) if self.previous_path.exists() else None
        try:
            return read(self.checkpoint_path)
        except UserError as error:
            if not self.previous_path.exists():
                raise
            state = read(self.previous_path)
            self._fallback_note = (
                f"{error}; resuming from {self.previous_path} (step {state.get('step')}) instead"
            )
            return state

    def _checkpoint_stamp(self) -> tuple:
        """(size, mtime) of the checkpoint and the previous one: tells whether another writer
        touched them."""
        return tuple(
            (p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None
            for p in (self.checkpoint_path, self.previous_path)
        )

    def _refuse_a_moved_checkpoint(self) -> None:
        """Between reading the checkpoint and taking the lock, another writer may have moved the
        run on."""
        if self._checkpoint_stamp() != self._stamp_at_start:
            raise UserError(
                f"run dir {self.run_dir} changed while this run started: another run wrote a "
                "checkpoint there; rerun to resume from it"
            )

    def _setup_outputs(self) -> None:
        if not self.is_main:
            return
        start_run_dir(self.run_dir, self.config)
        self._handlers = [attach_log(self.log, self.run_dir)]
        if self._lock is not None:
            self._lock.log_takeover(self.log)
        remove_partial_writes(self.checkpoint_path.parent, self.log)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "events"), purge_step=self.step or None)
        history = self.run_dir / "history.jsonl"
        if history.exists():  # drop what was logged after the checkpoint we resume from
            kept = [
                line
                for line in history.read_text().splitlines()
                if json.loads(line)["step"] <= self.step
            ]
            history.write_text("".join(line + "\n" for line in kept))
        self.history = open(history, "a")

    def save_checkpoint(self) -> None:
        """The checkpoint, written atomically; the one it replaces is kept as the previous file (a
        hard link), so
        a crash at any point leaves a loadable checkpoint. A failed write stops the run and keeps
        both."""
        if self.is_main:
            try:
                if self.checkpoint_path.exists():
                    link = self.previous_path.with_name(f".{self.previous_path.name}.link")
                    link.unlink(missing_ok=True)
                    os.link(self.checkpoint_path, link)
                    os.replace(link, self.previous_path)
                atomic_torch_save(
                    self.method.state_dict(self.step, self.elapsed()), self.checkpoint_path
                )
            except OSError as error:
                raise UserError(
                    f"cannot write checkpoint {self.checkpoint_path}: {error.strerror or error}; "
                    f"the "
                    "last good checkpoint is kept; fix that (e.g. free disk space) and rerun to "
                    f"resume"
                ) from None
            self.log.info("step %d: checkpoint %s", self.step, self.checkpoint_path)
        if self.dist.is_distributed:
            torch.distributed.barrier()

    # ---------------------------------------------------------------------------------- stopping

    def _request_stop(self, signum, frame) -> None:
        self.log.info("signal %d: checkpointing after this step", signum)
        self.stop_requested = True
        self._stop_asked_at = time.monotonic()

    def request_stop(self, then=None, budget_s: float | None = None) -> None:
        """Stop at the next step boundary, write a checkpoint, then call `then` (e.g. submitit's
        requeue).

        `budget_s` is the time left before the job is killed (SLURM's signal delay): the time from
        this call to the written checkpoint is logged, with a warning when it takes more than half
        of the budget."""
        self.stop_requested = True
        self._after_stop = then
        self._stop_asked_at, self._stop_budget_s = time.monotonic(), budget_s

    def _report_stop_latency(self) -> None:
        if self._stop_asked_at is None or not self.is_main:
            return
        took, budget = time.monotonic() - self._stop_asked_at, self._stop_budget_s
        self.log.info(
            "stop signal -> checkpoint written in %.1f s%s",
            took,
            f" (budget {budget:.0f} s)" if budget else "",
        )
        if budget and took > budget / 2:
            self.log.warning(
                "the checkpoint after the stop signal took %.1f s, more than half of the %.0f s "
                "before "
                "the job is killed: raise the executor's signal_delay_s, or "
                "checkpoint more often",
                took,
                budget,
            )

    # ---------------------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        """Train to the end of the method's schedule (or optim.max_steps); return the last logged
        stats."""
        if self.finished is not None:
            print(f"{self.name}: already done in {self.run_dir}: {self.finished['metrics']}")
            return self.finished["metrics"]
        lock = self._lock = RunDirLock(self.run_dir).acquire() if self.is_main else None
        try:
            if lock is not None:
                self._refuse_a_moved_checkpoint()
            return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _run(self) -> dict[str, Any]:
        method, log = self.method, self.log
        if self.resume_state is not None:
            self.step, self._elapsed_before = method.load_state_dict(self.resume_state)
            self.resume_state = None
        self._setup_outputs()
        if self.is_main and self._fallback_note:
            log.warning(self._fallback_note)
        if self.is_main:
            log.info(
                "processes: %d, global batch %d (%d per process)",
                self.dist.world_size,
                self.config.optim.batch_size,
                self.config.optim.batch_size // self.dist.world_size,
            )
        if self.is_main and self.step:
            log.info("resuming %s at step %d of %d", self.run_dir, self.step, self.stop_step)
        previous = signal.signal(signal.SIGTERM, self._request_stop)
        stats, skipped = {}, 0
        window_start, window_images = time.time(), 0
        progress = tqdm(
            total=self.stop_step,
            initial=self.step,
            disable=not (self.is_main and sys.stderr.isatty()),
            desc=self.name,
            unit="step",
            dynamic_ncols=True,
        )
        try:
            while self.step < self.stop_step and not self.stop_requested:
                epoch, start_batch = divmod(self.step, self.steps_per_epoch)
                for batch in method.loader(epoch, start_batch):
                    skipped += self._check_corrupt(batch)
                    step_stats = method.train_step(batch, self.step)
                    self.step += 1
                    if step_stats is None:  # nothing to train on in this batch
                        continue
                    stats = step_stats
                    window_images += method.images(batch)
                    progress.update(1)
                    progress.set_postfix(loss=f"{next(iter(stats.values())):.4f}", refresh=False)
                    if method.log_due(self.step):
                        stats["images_per_s"] = window_images / max(
                            1e-9, time.time() - window_start
                        )
                        window_start, window_images = time.time(), 0
                        stats = method.log_stats(stats, self.step)
                        self._log(stats, epoch)
                    if method.checkpoint_due(self.step):
                        self.save_checkpoint()
                    # every rank stops at the same step, whoever got the signal
                    if self.dist.is_distributed:
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
        if self.is_main and method.complete(self.step):
            method.export(self.run_dir)
            self._write_metrics(stats, skipped)
        return stats

    def _check_corrupt(self, batch) -> int:
        corrupt = batch.get("corrupt", ()) if isinstance(batch, dict) else ()
        for bad in corrupt:
            if self.config.data.on_corrupt == "error":
                raise UserError(
                    f"cannot read image {bad.path}: {bad.reason}; fix or remove it, or set "
                    "data.on_corrupt=skip to skip unreadable images"
                )
            self.log.warning("skipped unreadable image %s (%s)", bad.path, bad.reason)
        return len(corrupt)

    def _log(self, stats: dict[str, float], epoch: int) -> None:
        if not self.is_main:
            return
        for key, value in stats.items():
            self.writer.add_scalar(f"{self.name}/{key}", value, self.step)
        self.history.write(json.dumps({"step": self.step, "epoch": epoch, **stats}) + "\n")
        self.history.flush()
        self.log.info(
            "step %d/%d epoch %d " + " ".join(f"{k} {v:.4g}" for k, v in stats.items()),
            self.step,
            self.stop_step,
            epoch,
        )

    def _write_metrics(self, stats: dict[str, float], skipped: int) -> None:
        history = self.run_dir / "history.jsonl"
        if not stats and history.exists():  # resumed at the very end: report the last logged step
            lines = history.read_text().splitlines()
            stats = json.loads(lines[-1]) if lines else {}
        write_metrics(
            self.run_dir,
            **self.method.metrics(stats, skipped, self.step),
            seed=self.config.seed,
            config=OmegaConf.to_container(self.config, resolve=True),
            wall_time_s=self.elapsed(),
        )
