"""A step's job (slurm.steps.Job) as a submitit job that requeues itself.

On SIGUSR2 (SLURM's warning before the time limit, or a preemption signal) a training job
(pretraining, the supervised control) finishes its current step, writes a checkpoint, and then lets
submitit requeue it; the requeued job resumes from that checkpoint in the same run dir. Other steps
are short or resume from their own run-dir state, so they just requeue. On SIGTERM (scontrol
requeue, scancel) training also checkpoints at the step boundary and exits without a result, so that
a requeued job resumes and a cancelled one shows as cancelled."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from common.distributed import shutdown_distributed
from common.errors import UserError
from pretrain.engine import build_engine, load_step_config
from slurm.steps import Job, get_step
from transfer.__main__ import main
from transfer.runner import run_task


class StepJob:
    """Callable by submitit: runs a Job's step in this process, as `python -m ...` (Job.command)
    would."""

    def __init__(self, job: Job, signal_delay_s: float | None = None):
        self.job = job
        # SIGUSR2 comes this long before the kill: the checkpoint's budget
        self.signal_delay_s = signal_delay_s

    def __repr__(self) -> str:
        return f"StepJob({self.job!r})"

    def __call__(self) -> Any:
        step = get_step(self.job.step)
        try:
            if step.kind == "training":
                return self._train()
            if step.kind == "task":
                run_task(
                    step.name,
                    self.job.options["backbone"],
                    self.job.options.get("weights", "ema"),
                    self.job.config,
                    self._overrides(),
                )
            else:
                main(self.job.command()[1:])
        except UserError as error:  # the job's stderr ends with the step's own one-line message
            raise RuntimeError(f"{step.name} failed: {' '.join(str(error).split())}") from None
        return self._metrics()

    def _overrides(self) -> list[str]:
        return ([f"run_dir={self.job.run_dir}"] if self.job.run_dir is not None else []) + list(
            self.job.overrides
        )

    def _train(self) -> Any:
        config = load_step_config(self.job.step, self.job.config, self._overrides())
        engine = build_engine(self.job.step, config)
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        if callable(submitit_handler):

            def on_usr2(signum, frame):  # checkpoint at the step boundary, then submitit requeues
                engine.request_stop(
                    lambda: submitit_handler(signum, None), budget_s=self.signal_delay_s
                )

            signal.signal(signal.SIGUSR2, on_usr2)
        stats = engine.run()
        # SIGTERM: checkpointed; exit without a result, the job is being ended
        if engine.stop_requested:
            logging.shutdown()
            os._exit(143)
        shutdown_distributed()
        return {"stats": stats, **(self._metrics(str(config.run_dir)) or {})}

    def _metrics(self, run_dir: str | None = None) -> Any:
        run_dir = run_dir or self.job.run_dir
        path = Path(run_dir) / "metrics.json" if run_dir else None
        return json.loads(path.read_text()) if path and path.exists() else None

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on SIGUSR2: the same job again; it resumes from its run dir."""
        import submitit

        return submitit.helpers.DelayedSubmission(StepJob(self.job, self.signal_delay_s))
