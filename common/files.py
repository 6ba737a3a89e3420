"""Atomic file writes: a reader (or a preempted job) never sees a half-written file."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_partial_writes(folder: Path, logger, name: str = "*") -> None:
    """Delete the temporary files that `atomic_write_bytes` left in `folder` when its process was
    killed mid-write
    (only `name`'s, or all); the one writer of `folder` calls it before it writes there again."""
    for partial in Path(folder).glob(f".{name}.*.tmp"):
        logger.info("removing %s, left by an interrupted checkpoint write", partial)
        partial.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save, atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
