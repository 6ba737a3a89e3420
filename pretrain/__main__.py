"""python -m pretrain --config FILE [key=value ...]: SSL-HSIC pretraining into the config's run
dir."""

from __future__ import annotations

import sys
from typing import Sequence

from common.cli import config_parser, run_main
from common.config import load_config
from pretrain.schema import PretrainConfig
from pretrain.trainer import train

EPILOG = """\
examples:
  python -m pretrain --config configs/pretrain/fashion_mnist_resnet18.yaml
  python -m pretrain --config configs/pretrain/fashion_mnist_resnet18.yaml run_dir=runs/fm seed=1 optim.epochs=2
  python -m pretrain --config configs/pretrain/imagenet_resnet50.yaml data.root=/datasets/imagenet

The run dir receives config.yaml, checkpoints/, events (TensorBoard), log.txt and metrics.json.
Rerunning into a run dir that holds a checkpoint resumes it; a run dir of another config is refused.
All keys, with their defaults: pretrain/schema.py."""


def main(argv: Sequence[str] | None = None) -> None:
    parser = config_parser(
        "python -m pretrain", "Pretrain an image backbone with SSL-HSIC.", EPILOG
    )
    args = parser.parse_args(argv)
    config = load_config(PretrainConfig, args.config, args.overrides)
    train(config)


def entry() -> None:
    sys.exit(run_main(main))


if __name__ == "__main__":
    entry()
