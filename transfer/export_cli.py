"""python -m transfer export: a checkpoint -> torchvision / safetensors / detectron2 / mmseg files."""
from __future__ import annotations

import argparse

EPILOG = """\
examples:
  python -m transfer export --checkpoint runs/fm/checkpoints/last.pt --format detectron2 --out r18.pkl
  python -m transfer export --checkpoint moco_v2.pth.tar --format all --out exported/
Beside each file, FILE.json records the source and its sha256, the architecture and the weights taken."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--checkpoint", required=True, help="a pretraining checkpoint, torchvision or SSL state_dict")
    parser.add_argument("--format", required=True, choices=["torchvision", "safetensors", "detectron2", "mmseg", "all"])
    parser.add_argument("--out", required=True, help="output file (a folder with --format all)")
    parser.add_argument("--weights", default="ema", choices=["ema", "online", "target"],
                        help="which network of a pretraining checkpoint (default: the EMA network)")
    parser.add_argument("--arch", help="expected architecture (default: detected from the keys)")


def run(args: argparse.Namespace) -> None:
    from transfer import export
    from transfer.backbone import load_backbone
    backbone = load_backbone(args.checkpoint, args.weights, args.arch)
    written = export.write_all(backbone, args.out) if args.format == "all" else \
        {args.format: export.write(backbone, args.format, args.out)}
    for fmt, path in written.items():
        print(f"{fmt:12s} {path}  ({backbone.arch}, {backbone.weights} weights, {backbone.layout})")
