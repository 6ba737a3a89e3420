"""mmengine 0.10 on torch >= 2.6: resuming from its own checkpoints. The one patch to mmengine lives here.

torch 2.6 made torch.load default to weights_only=True; mmengine 0.10.7 calls torch.load(filename) for local
files, and its training checkpoints hold its own objects (the message hub's HistoryBuffer, numpy values), so
resuming fails. `trusting(folder)` registers a local loader that keeps weights_only=True for every file except
those under `folder`, the run's own work_dir, which only this run wrote. Newer mmengine releases pass
weights_only themselves; the patch is applied only while torch.load defaults to weights_only.
"""
from __future__ import annotations

import os.path as osp
from contextlib import contextmanager
from pathlib import Path

import torch


def _defaults_to_weights_only() -> bool:
    import inspect
    return "weights_only" in inspect.signature(torch.load).parameters and \
        tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)


@contextmanager
def trusting(folder: str | Path):
    from mmengine.runner.checkpoint import CheckpointLoader
    if not _defaults_to_weights_only():
        yield
        return
    trusted = str(Path(folder).resolve()) + osp.sep
    original = CheckpointLoader._schemes[""]

    def load_from_local(filename, map_location):
        filename = osp.expanduser(filename)
        if not osp.isfile(filename):
            raise FileNotFoundError(f"{filename} can not be found.")
        own = str(Path(filename).resolve()).startswith(trusted)
        return torch.load(filename, map_location=map_location, weights_only=not own)

    CheckpointLoader._schemes[""] = load_from_local
    try:
        yield
    finally:
        CheckpointLoader._schemes[""] = original
