"""What every transfer task shares: its run dir (config.yaml, log.txt, metrics.json), the backbone
record, the command line, and rerun behaviour: a finished run with the same config and backbone is
reported, not repeated.

Under several processes (SLURM tasks, torchrun) every rank runs the task; rank 0 alone holds the run
dir's lock and writes config.yaml, log.txt and metrics.json. The other ranks log to stderr only
(SLURM keeps a log per task)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.config import load_config
from common.distributed import detect, match_threads_to_allocation, shutdown_distributed
from common.errors import UserError
from common.files import atomic_write_bytes
from common.records import metrics_record, sha256_of
from common.rundir import (
    RunDirLock,
    attach_log,
    detach_log,
    pick_device,
    refuse_other_config,
    start_run_dir,
)
from transfer import WEIGHTS, tasks
from transfer.backbone import Backbone, fingerprint, resolve_backbone

log = logging.getLogger("transfer")
RERUN_SAFE = {"run_dir", "data.num_workers", "device"}  # keys a rerun may change


@dataclass
class TaskResult:
    metrics: dict[str, float]
    dataset: str
    protocol: str
    extra: dict[str, Any] = field(default_factory=dict)
    # metric -> False where, given the backbone's weights and the data, the metric cannot change
    # with config.seed (no seeded init, order, augmentation or split reaches it); a metric not named
    # may vary. metrics.json records it for every metric as `varies_with_seed`; the report shows a
    # fixed checkpoint's column of a False one as one value.
    varies_with_seed: dict[str, bool] = field(default_factory=dict)


def backbone_record(backbone: Backbone) -> dict[str, str]:
    """name, path, sha256 (of the file; of the weights for random init), the weights' fingerprint,
    which network,
    the file layout it was read from (and which of its parts), architecture."""
    weights = fingerprint(backbone.state_dict)
    digest = sha256_of(backbone.source) if Path(backbone.source).is_file() else weights
    record = {
        "name": backbone.name,
        "path": backbone.source,
        "sha256": digest,
        "fingerprint": weights,
        "weights": backbone.weights,
        "layout": backbone.layout,
        "arch": backbone.arch,
    }
    return {**record, "padding": "same"} if backbone.padding == "same" else record


class TaskRun:
    """One task on one backbone in one run dir."""

    def __init__(self, task: str, config: DictConfig, backbone: Backbone):
        self.task, self.config, self.backbone = task, config, backbone
        self.run_dir = Path(config.run_dir)
        self.record = backbone_record(backbone)
        self.started = time.time()
        refuse_other_config(self.run_dir, config, RERUN_SAFE, task)
        metrics = self.run_dir / "metrics.json"
        if metrics.exists():
            previous = json.loads(metrics.read_text())
            if previous.get("backbone", {}).get("sha256") != self.record["sha256"]:
                raise UserError(
                    f"run dir {self.run_dir} holds results of another backbone "
                    f"({previous.get('backbone', {}).get('path')}); choose another "
                    f"run_dir"
                )

    def finished(self) -> dict[str, Any] | None:
        """The metrics of a completed earlier run of this config and backbone, if any."""
        path = self.run_dir / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else None

    def start(self) -> None:
        """Take the run dir (rank 0 holds its lock and writes config.yaml and log.txt); every rank
        may write
        files of its own task into it (the backbone in a framework's format, rank 0's checkpoints).
        """
        self.is_main = detect().rank == 0
        self.lock = RunDirLock(self.run_dir).acquire() if self.is_main else None
        if self.is_main:
            start_run_dir(self.run_dir, self.config)
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._handler = attach_log(log, self.run_dir if self.is_main else None)
        if self.lock is not None:
            self.lock.log_takeover(log)
        log.info(
            "%s: backbone %s (%s, %s)",
            self.task,
            self.backbone.source,
            self.backbone.arch,
            self.backbone.layout,
        )

    def finish(self, result: TaskResult) -> dict:
        """metrics.json's content; rank 0 writes it."""
        protocol_id = (
            {"protocol_id": self.config.protocol_id} if self.config.get("protocol_id") else {}
        )
        varies = {
            "varies_with_seed": {
                k: bool(result.varies_with_seed.get(k, True)) for k in result.metrics
            }
        }
        record = metrics_record(
            task=self.task,
            dataset=result.dataset,
            backbone=self.record,
            protocol=result.protocol,
            metrics=result.metrics,
            seed=self.config.seed,
            config=OmegaConf.to_container(self.config, resolve=True),
            wall_time_s=time.time() - self.started,
            extra={**protocol_id, **varies, **(result.extra or {})},
        )
        if self.is_main:
            atomic_write_bytes(self.run_dir / "metrics.json", json.dumps(record, indent=2).encode())
        log.info("%s: %s", self.task, ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
        return record

    def close(self) -> None:
        """Close the log and release the run dir (also after a failure)."""
        if getattr(self, "_handler", None) is not None:
            detach_log(log, self._handler)
            self._handler = None
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None


def add_task_arguments(parser, epilog: str = "") -> None:
    """`--backbone PATH|random:ARCH [--weights W] --config FILE [key=value ...]`, shared by the
    transfer tasks."""
    parser.epilog = epilog + (
        "\n--backbone takes any checkpoint `transfer export` accepts, or random:ARCH for the "
        "same network at random init (the baseline)."
    )
    parser.add_argument("--backbone", required=True, help="checkpoint path, or random:ARCH")
    parser.add_argument(
        "--weights",
        default="ema",
        choices=WEIGHTS,
        help="which network of a pretraining checkpoint (default: ema)",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def run_task(
    name: str,
    backbone_spec: str,
    weights: str = "ema",
    config_path: str | None = None,
    overrides: list[str] = (),
) -> dict:
    """Load the config and backbone, report a finished run, else prepare the data, start the run
    dir, run the
    task and write metrics.json; return its content."""
    task = tasks.get(name)
    module = task.load()
    config = load_config(module.Config, config_path, overrides)
    if getattr(config, "device", None) is not None:
        # device=cuda without a GPU is refused before anything is written
        pick_device(config.device)
    backbone = resolve_backbone(backbone_spec, config.seed, weights)
    run = TaskRun(name, config, backbone)
    if (done := run.finished()) is not None:
        print(f"{name}: already done in {run.run_dir}: {done['metrics']}")
        return done
    data = module.prepare(config)  # refuses missing or bad data before the run dir is written
    match_threads_to_allocation()
    try:
        run.start()
        # another writer finished it while this one prepared
        if (done := run.finished()) is not None:
            return done
        result = run.finish(task.runner()(config, backbone, run, data))
        shutdown_distributed()
    finally:
        run.close()
    shown = {k: v for k, v in result["metrics"].items() if not k.startswith("IoU.")}
    print(f"{name}: {', '.join(f'{k} {v:.4g}' for k, v in shown.items())}  ({run.run_dir})")
    return result
