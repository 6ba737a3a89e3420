"""python -m transfer verify: the exported backbone gives the same features in torchvision, detectron2, mmseg."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="any checkpoint `transfer export` accepts")
    parser.add_argument("--weights", default="ema", choices=["ema", "online", "target"])
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference per stage (default 1e-4)")
    parser.add_argument("--image-size", type=int, default=96)


def run(args: argparse.Namespace) -> None:
    from transfer.backbone import load_backbone
    from transfer.verify import verify
    backbone = load_backbone(args.checkpoint, args.weights)
    report = verify(backbone, args.image_size, args.tolerance)
    print(f"{backbone.arch} from {backbone.source} ({backbone.layout}), max abs difference to torchvision:")
    print(report.table())
    print(f"ok: every weight used, worst stage difference {report.worst():.2e} <= {args.tolerance:g}")
