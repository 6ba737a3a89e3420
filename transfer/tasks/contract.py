"""What every transfer task shares in its config: the fields the runner, the pipeline and the report
read.

A task's `Config` is a dataclass extending `TaskConfig` with its own keys (data, protocol,
schedule); it redeclares `run_dir` only to give its own default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from common.checks import DEVICE, NON_NEGATIVE, checked


@dataclass
class TaskConfig:
    # where config.yaml, log.txt, metrics.json and the task's state go
    run_dir: str = "runs/transfer"
    protocol_id: str = ""  # the published protocol followed (transfer/references.yaml)
    # every random stream of the run derives from it (common.seeds)
    seed: int = checked(0, NON_NEGATIVE)
    device: Optional[str] = checked(None, DEVICE)  # cuda, cpu, or None: cuda when there is one
