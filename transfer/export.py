"""Writers of the canonical backbone to the formats other tools read, each with a sidecar JSON.

    torchvision   .pth          the canonical state_dict (torch.save)
    safetensors   .safetensors  the same tensors, no pickle at all
    detectron2    .pkl          {"model": {name: numpy}, "__author__", "matching_heuristics": True}, plain pickle,
                                with MoCo's renames: stem.*, layerN -> res(N+1), bnK -> convK.norm, downsample.0/1
                                -> shortcut / shortcut.norm (BN's batch counters dropped: detectron2 has none)
    mmseg         .pth          {"state_dict": {"backbone." + name: tensor}, "meta": ...}: mmsegmentation's ResNet
                                loads it with init_cfg=dict(type="Pretrained", checkpoint=PATH, prefix="backbone.")

Every architecture of the table (pretrain.networks: widths 1x / 2x / 4x, ResNet-200) is written with
the same key names; only the shapes differ. The detectron2 and mmseg files need the matching channel
settings in the loading framework, which the sidecar records (`loading`): detectron2's
MODEL.RESNETS.{DEPTH, STEM_OUT_CHANNELS, RES2_OUT_CHANNELS, NUM_GROUPS, WIDTH_PER_GROUP} and mmseg's
backbone dict(type, depth, stem_channels, base_channels).

Sidecar PATH.json: source path and sha256, architecture, which weights (ema / online / target),
layout, format, and for detectron2 / mmseg the loading framework's settings."""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
from pathlib import Path

import torch

from common.errors import UserError
from common.files import atomic_write_bytes
from common.records import code_version, sha256_of
from pretrain.networks import architecture
from transfer.backbone import Backbone, fingerprint

FORMATS = {
    "torchvision": ".pth",
    "safetensors": ".safetensors",
    "detectron2": ".pkl",
    "mmseg": ".mmseg.pth",
}


def _detectron2_settings(arch: str) -> dict:
    """detectron2's config keys for this architecture (transfer.detectron2_glue.configure_resnet
    sets them)."""
    from transfer.detectron2_glue import DETECTRON2_DEPTHS, TABLE_BUILDERS, resnet_settings

    settings = {f"MODEL.RESNETS.{k}": v for k, v in resnet_settings(arch).items()}
    # built by the builders transfer.detectron2_glue registers
    if architecture(arch).depth not in DETECTRON2_DEPTHS:
        settings["MODEL.BACKBONE.NAME"] = list(TABLE_BUILDERS.values())
    return settings


def _mmseg_settings(arch: str) -> dict:
    from transfer.mmseg_glue import resnet_backbone

    return resnet_backbone(arch)


# The settings each framework's ResNet needs to load the file: written into the sidecar
LOADING = {"detectron2": _detectron2_settings, "mmseg": _mmseg_settings}


def to_detectron2(state_dict: dict[str, torch.Tensor]) -> dict:
    """detectron2's names for a torchvision ResNet (as MoCo's convert-pretrain-to-detectron2.py)."""
    model = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        k = key if "layer" in key else "stem." + key
        k = re.sub(r"layer([1-4])", lambda m: f"res{int(m.group(1)) + 1}", k)
        k = re.sub(r"bn([1-3])", r"conv\1.norm", k)
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        model[k] = value.detach().cpu().numpy()
    return {"model": model, "__author__": "ssl-hsic", "matching_heuristics": True}


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def encode(backbone: Backbone, fmt: str) -> bytes:
    if fmt == "torchvision":
        return _torch_bytes(backbone.state_dict)
    if fmt == "safetensors":
        from safetensors.torch import save

        return save(
            backbone.state_dict, metadata={"arch": backbone.arch, "format": "torchvision-resnet"}
        )
    if fmt == "detectron2":
        # what detectron2's model zoo uses
        return pickle.dumps(to_detectron2(backbone.state_dict), protocol=4)
    if fmt == "mmseg":
        return _torch_bytes(
            {
                "state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict.items()},
                "meta": {"arch": backbone.arch, "source": backbone.source},
            }
        )
    raise UserError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)} or all")


def write(backbone: Backbone, fmt: str, out: str | Path) -> Path:
    """Write one format atomically, then its sidecar JSON; return the output path. A backbone
    trained with TensorFlow's SAME padding (the official JAX checkpoints) is written as is, with a
    warning: the other
    frameworks' ResNets pad symmetrically, which shifts the input of each strided layer by one
    pixel."""
    out = Path(out)
    if backbone.padding == "same":
        logging.getLogger("transfer").warning(
            "%s: this backbone was trained with TensorFlow's SAME padding; the %s ResNet pads "
            "symmetrically, so "
            "its strided layers see the input shifted by one pixel (the platform's own tasks pad "
            "as trained)",
            backbone.source,
            fmt,
        )
    data = encode(backbone, fmt)
    atomic_write_bytes(out, data)
    sidecar = {
        "format": fmt,
        "arch": backbone.arch,
        "weights": backbone.weights,
        "layout": backbone.layout,
        "padding": backbone.padding,
        "source": backbone.source,
        "sha256": sha256_of(out),
        "source_sha256": sha256_of(backbone.source) if Path(backbone.source).is_file() else None,
        "weights_fingerprint": fingerprint(backbone.state_dict),
        "code_version": code_version(),
    }
    if fmt in LOADING:
        sidecar["loading"] = LOADING[fmt](backbone.arch)
    atomic_write_bytes(out.with_name(out.name + ".json"), json.dumps(sidecar, indent=2).encode())
    return out


def write_all(backbone: Backbone, out_dir: str | Path, stem: str | None = None) -> dict[str, Path]:
    """Every format into out_dir: STEM.pth, STEM.safetensors, STEM.pkl, STEM.mmseg.pth."""
    stem = stem or f"backbone_{backbone.weights}"
    return {
        fmt: write(backbone, fmt, Path(out_dir) / f"{stem}{suffix}")
        for fmt, suffix in FORMATS.items()
    }
