"""The pretraining checkpoint format, owned here: what `checkpoints/last.pt` holds and how to read
it.

    {"format": "ssl-hsic/pretrain", "version": 1, "step", "elapsed_s", "config" (YAML text), "backbone" (arch),
     "online": OnlineNetwork state, "target": Encoder state or None, "ema": OnlineNetwork state,
     "loss", "optimizer", "scale_optimizer", "rng"}

The backbone of each network sits under a prefix: `encoder.backbone.` in the online and EMA networks
(an OnlineNetwork), `backbone.` in the target (an Encoder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.errors import UserError

FORMAT = "ssl-hsic/pretrain"
VERSION = 1
# weights name -> (entry of the checkpoint, prefix of the backbone's keys inside it)
NETWORKS = {
    "ema": ("ema", "encoder.backbone."),
    "online": ("online", "encoder.backbone."),
    "target": ("target", "backbone."),
}


def is_pretrain_checkpoint(raw: Any) -> bool:
    return isinstance(raw, dict) and raw.get("format") == FORMAT


def backbone_state(raw: dict, weights: str) -> dict:
    """The backbone state_dict (torchvision names) of one network of a pretraining checkpoint."""
    if weights not in NETWORKS:
        raise UserError(f"weights must be one of {', '.join(NETWORKS)}, not '{weights}'")
    part, prefix = NETWORKS[weights]
    if raw.get(part) is None:
        raise UserError(
            f"this checkpoint has no {part} network (a no-target run has no target); "
            "choose weights=ema or weights=online"
        )
    return {k[len(prefix) :]: v for k, v in raw[part].items() if k.startswith(prefix)}


def load(path: str | Path) -> dict:
    """Read a pretraining checkpoint for resuming; a UserError names an unreadable or foreign
    file."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(
            f"checkpoint {path} cannot be read ({type(error).__name__}); "
            "remove it to start over, or restore it from a backup"
        ) from None
    if not is_pretrain_checkpoint(state):
        raise UserError(f"{path} is not an SSL-HSIC pretraining checkpoint")
    return state
