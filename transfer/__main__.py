"""python -m transfer <command> ...: export backbones and evaluate them on transfer tasks."""
from __future__ import annotations

import sys
from typing import Sequence

from pretrain.cli import run_main, subcommand_parser

# command -> (module, one-line help); see pretrain.cli.subcommand_parser.
COMMANDS = {
    "export": ("transfer.export_cli", "write a backbone as torchvision / safetensors / detectron2 / mmseg files"),
    "verify": ("transfer.verify_cli", "check an exported backbone gives the same features in all three frameworks"),
    "linear": ("transfer.classification_cli", "linear classification on frozen (cached) features"),
    "knn": ("transfer.classification_cli", "k-nearest-neighbour classification on frozen (cached) features"),
    "segmentation": ("transfer.segmentation_cli", "semantic segmentation (FCN) through mmsegmentation"),
    "detection": ("transfer.detection_cli", "detection / instance segmentation through detectron2"),
    "depth": ("transfer.depth_cli", "monocular depth (FCRN up-projection decoder, berHu loss)"),
    "scenes": ("transfer.scenes_cli", "generate dense-task scenes in VOC, COCO and NYU formats"),
    "pipeline": ("transfer.pipeline_cli", "the main job: pretrain, export, every task vs random init, report"),
    "report": ("transfer.report_cli", "a table (md, csv) and plots from finished runs' metrics.json"),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = subcommand_parser("python -m transfer", __doc__.split(":", 1)[1].strip(), COMMANDS)
    args = parser.parse_args(argv)
    args.run(args)


def entry() -> None:
    sys.exit(run_main(main))


if __name__ == "__main__":
    entry()
