"""What every transfer task shares: its run dir (config.yaml, log.txt, metrics.json), the backbone record,
and rerun behaviour: a finished run with the same config and backbone is reported, not repeated."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pretrain.config import config_differences, save_config
from pretrain.errors import UserError
from pretrain.metrics import sha256_of, write_metrics
from transfer.backbone import Backbone, fingerprint

log = logging.getLogger("transfer")
RERUN_SAFE = {"run_dir", "data.num_workers", "device"}


def backbone_record(backbone: Backbone) -> dict[str, str]:
    if Path(backbone.source).is_file():
        return {"path": backbone.source, "sha256": sha256_of(backbone.source), "weights": backbone.weights,
                "arch": backbone.arch}
    return {"path": backbone.source, "sha256": fingerprint(backbone.state_dict), "weights": backbone.weights,
            "arch": backbone.arch}


class TaskRun:
    """One task on one backbone in one run dir."""

    def __init__(self, task: str, config: DictConfig, backbone: Backbone):
        self.task, self.config, self.backbone = task, config, backbone
        self.run_dir = Path(config.run_dir)
        self.record = backbone_record(backbone)
        self.started = time.time()
        saved = self.run_dir / "config.yaml"
        if saved.exists():
            differences = config_differences(OmegaConf.to_container(OmegaConf.load(saved)),
                                             OmegaConf.to_container(config, resolve=True), RERUN_SAFE)
            if differences:
                raise UserError(f"run dir {self.run_dir} holds a {task} run of another config (differs at "
                                f"{', '.join(differences[:5])}); choose another run_dir or remove that one")
        metrics = self.run_dir / "metrics.json"
        if metrics.exists():
            previous = json.loads(metrics.read_text())
            if previous.get("backbone", {}).get("sha256") != self.record["sha256"]:
                raise UserError(f"run dir {self.run_dir} holds results of another backbone "
                                f"({previous.get('backbone', {}).get('path')}); choose another run_dir")

    def finished(self) -> dict[str, Any] | None:
        """The metrics of a completed earlier run of this config and backbone, if any."""
        path = self.run_dir / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else None

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not (self.run_dir / "config.yaml").exists():
            save_config(self.config, self.run_dir / "config.yaml")
        self._handler = logging.FileHandler(self.run_dir / "log.txt")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self._handler)
        if not any(getattr(h, "stream", None) is sys.stderr for h in log.handlers):
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(console)
        log.setLevel(logging.INFO)
        log.info("%s: backbone %s (%s, %s)", self.task, self.backbone.source, self.backbone.arch, self.backbone.layout)

    def finish(self, metrics: dict[str, float], dataset: str, protocol: str, extra: dict | None = None) -> dict:
        write_metrics(self.run_dir, task=self.task, dataset=dataset, backbone=self.record, protocol=protocol,
                      metrics=metrics, seed=self.config.seed, config=OmegaConf.to_container(self.config, resolve=True),
                      wall_time_s=time.time() - self.started, extra=extra)
        log.info("%s: %s", self.task, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        log.removeHandler(self._handler)
        self._handler.close()
        return json.loads((self.run_dir / "metrics.json").read_text())


def pick_device(name: str | None):
    import torch
    if name in (None, "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        raise UserError("device=cuda but no GPU is visible; set device=cpu")
    return torch.device("cpu")


def add_task_arguments(parser, epilog: str = "") -> None:
    """`--backbone PATH|random:ARCH [--weights W] --config FILE [key=value ...]`, shared by the transfer tasks."""
    parser.epilog = epilog + ("\n--backbone takes any checkpoint `transfer export` accepts, or random:ARCH for the "
                              "same network at random init (the baseline).")
    parser.add_argument("--backbone", required=True, help="checkpoint path, or random:ARCH")
    parser.add_argument("--weights", default="ema", choices=["ema", "online", "target"],
                        help="which network of a pretraining checkpoint (default: ema)")
    parser.add_argument("--config", metavar="FILE", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def run_task(task: str, schema: type, args, body) -> dict:
    """Load the config and backbone, skip a finished run, else run `body(config, backbone, run)`, which returns
    (metrics, dataset, protocol) or (metrics, dataset, protocol, extra), and write metrics.json."""
    from pretrain.config import load_config
    from transfer.backbone import resolve_backbone
    config = load_config(schema, args.config, args.overrides)
    backbone = resolve_backbone(args.backbone, config.seed, args.weights)
    run = TaskRun(task, config, backbone)
    if (done := run.finished()) is not None:
        print(f"{task}: already done in {run.run_dir}: {done['metrics']}")
        return done
    metrics, dataset, protocol, *extra = body(config, backbone, run)
    result = run.finish(metrics, dataset, protocol, extra[0] if extra else None)
    print(f"{task}: {', '.join(f'{k} {v:.4g}' for k, v in metrics.items() if not k.startswith('IoU.'))}  ({run.run_dir})")
    return result
