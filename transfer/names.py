"""Backbone names: `NAME=PATH` on any command that takes a backbone, or a name derived from the
path.

    random:resnet18                 -> random-resnet18   (random init: the baseline)
    runs/fm/checkpoints/last.pt     -> fm                (a pretraining run: its run dir)
    /ckpt/moco_v2_800ep.pth.tar     -> moco_v2_800ep     (any other file: its name up to the first dot)
    byol=/ckpt/pretrain_res50x1.pkl -> byol
"""

from __future__ import annotations

import re
from pathlib import Path

NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def default_name(path: str) -> str:
    if path.startswith("random:"):
        return path.replace(":", "-")
    p = Path(path)
    name = p.parent.parent.name if p.parent.name == "checkpoints" else p.name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name) or "backbone"


def split_named(spec: str) -> tuple[str, str]:
    """(name, path or random:ARCH) of a backbone argument `NAME=PATH` or `PATH`."""
    name, sep, rest = spec.partition("=")
    if sep and NAME.match(name) and rest and not Path(spec).exists():
        return name, rest
    return default_name(spec), spec
