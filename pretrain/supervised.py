"""The positive control: the pretraining network trained on the labels instead, for the same budget.

    python -m pretrain.supervised --config configs/pretrain/fashion_mnist_resnet18.yaml run_dir=runs/supervised

It reads the pretraining config (data, architecture, epochs, batch size, seed, image size and
normalisation) and trains backbone + a linear classifier with cross-entropy: Adam (lr 1e-3, weight
decay 1e-4), a cosine decay to 0 over the same number of steps as pretraining, random resized crops
(area 0.35-1) and flips. Evaluated beside the SSL-HSIC backbone and random init, it shows how far
apart the transfer evaluation can put two backbones.

RUN_DIR gets config.yaml, log.txt, history.jsonl, events, checkpoints/progress.pt (resumable per
epoch, and at the step a SIGTERM or a stop request came; the one it replaced kept as
progress.previous.pt), backbone.pth (the torchvision state dict without the classifier: what every
transfer command reads) and metrics.json (the last epoch's training loss and accuracy). A rerun of a
finished run reports it. The method: pretrain/methods/supervised.py; the loop, run dir and signals:
pretrain/engine.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from common.cli import config_parser
from pretrain.engine import build_engine, load_step_config


def train_supervised(config) -> dict:
    """Train (or resume, or report a finished run) and return the run's metrics.json record."""
    engine = build_engine("supervised", config)
    stats = engine.run()
    path = Path(config.run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {"metrics": stats}


def main(argv: Sequence[str] | None = None) -> None:
    parser = config_parser(
        "python -m pretrain.supervised",
        "Train the pretraining network on the labels (the positive control).",
        __doc__.split("\n\n")[1],
    )
    args = parser.parse_args(argv)
    train_supervised(load_step_config("supervised", args.config, args.overrides))


if __name__ == "__main__":
    from common.cli import run_main

    sys.exit(run_main(main))
