"""A project step (pretrain, export, a transfer task) as a submitit job that requeues itself.

On SIGUSR2 (SLURM's warning before the time limit, or a preemption signal) a pretraining job finishes its
current step, writes a checkpoint, and then lets submitit requeue it; the requeued job resumes from that
checkpoint in the same run dir. Other steps are short or resume from their own run-dir state, so they just
requeue. On SIGTERM (scontrol requeue, scancel) pretraining also checkpoints at the step boundary and exits
without a result, so that a requeued job resumes and a cancelled one shows as cancelled.
"""
from __future__ import annotations

import os
import signal
from typing import Any

TOOLS = ("export", "verify", "scenes", "report")


def steps() -> tuple[str, ...]:
    """Every step a job can run: pretraining, the transfer tools, and the registered transfer tasks."""
    from transfer.tasks import TASKS
    return ("pretrain", "supervised", *TOOLS, *TASKS)


class StepJob:
    """Callable by submitit: runs `python -m pretrain ARGV` or `python -m transfer STEP ARGV` in-process."""

    def __init__(self, step: str, argv: list[str], signal_delay_s: float | None = None):
        if step not in steps():
            from common.errors import UserError
            raise UserError(f"unknown step '{step}'; choose one of {', '.join(steps())}")
        self.step, self.argv = step, list(argv)
        self.signal_delay_s = signal_delay_s  # SIGUSR2 comes this long before the kill: the checkpoint's budget

    def __repr__(self) -> str:
        return f"StepJob({self.step!r}, {self.argv!r})"

    def __call__(self) -> Any:
        if self.step == "pretrain":
            return self._pretrain()
        from common.errors import UserError
        if self.step == "supervised":  # resumes from its per-epoch progress file when requeued
            from pretrain.supervised import main as supervised
            try:
                return supervised(self.argv)
            except UserError as error:
                raise RuntimeError(f"supervised failed: {' '.join(str(error).split())}") from None
        from transfer.__main__ import main
        try:
            main([self.step, *self.argv])
        except UserError as error:  # the job's stderr ends with the step's own one-line message
            raise RuntimeError(f"{self.step} failed: {' '.join(str(error).split())}") from None
        return self._metrics()

    def _pretrain(self) -> Any:
        from common.cli import config_parser
        from common.config import load_config
        from pretrain.schema import PretrainConfig
        from pretrain.trainer import Pretrainer
        args = config_parser("pretrain", "").parse_args(self.argv)
        config = load_config(PretrainConfig, args.config, args.overrides)
        self.run_dir = config.run_dir
        trainer = Pretrainer(config)
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        if callable(submitit_handler):
            def on_usr2(signum, frame):  # checkpoint at the step boundary, then submitit requeues
                trainer.request_stop(lambda: submitit_handler(signum, None), budget_s=self.signal_delay_s)
            signal.signal(signal.SIGUSR2, on_usr2)
        stats = trainer.run()
        if trainer.stop_requested:  # SIGTERM: checkpointed; exit without a result, the job is being ended
            import logging
            logging.shutdown()
            os._exit(143)
        from common.distributed import shutdown_distributed
        shutdown_distributed()
        return {"stats": stats, **(self._metrics() or {})}

    def _metrics(self) -> Any:
        import json
        from pathlib import Path
        run_dir = getattr(self, "run_dir", None) or next(
            (a.split("=", 1)[1] for a in self.argv if a.startswith("run_dir=")), None)
        path = Path(run_dir) / "metrics.json" if run_dir else None
        return json.loads(path.read_text()) if path and path.exists() else None

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on SIGUSR2: the same job again; it resumes from its run dir."""
        import submitit
        return submitit.helpers.DelayedSubmission(StepJob(self.step, self.argv, self.signal_delay_s))
