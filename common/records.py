"""metrics.json, the one file per run that reports read (its schema: docs/design.md)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import __version__
from common.files import atomic_write_bytes


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def code_version() -> str:
    """The package version, plus the git commit (and '-dirty') when run from a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+{commit}{'-dirty' if dirty else ''}" if commit else __version__


def file_record(path: str | Path) -> dict[str, str]:
    """{"path", "sha256"} of a file, as metrics.json records a backbone."""
    return {"path": str(Path(path).resolve()), "sha256": sha256_of(path)}


def metrics_record(
    *,
    task: str,
    dataset: str,
    backbone: dict[str, str] | None,
    protocol: str,
    metrics: dict[str, float],
    seed: int,
    config: dict[str, Any],
    wall_time_s: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of metrics.json. `backbone` is {"path", "sha256", ...}."""
    return {
        "task": task,
        "dataset": dataset,
        "backbone": backbone,
        "protocol": protocol,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "seed": seed,
        "config": config,
        "code_version": code_version(),
        "wall_time_s": round(wall_time_s, 3),
        "threads": torch_threads(),
        **(extra or {}),
    }


def torch_threads() -> int | None:
    """torch's intra-op threads in this process (None before torch is imported): reductions split
    across threads
    round differently, so a run's numbers depend on it."""
    return sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None


def write_metrics(run_dir: str | Path, **fields: Any) -> Path:
    """Write run_dir/metrics.json (the fields of `metrics_record`) atomically and return its
    path."""
    path = Path(run_dir) / "metrics.json"
    atomic_write_bytes(path, json.dumps(metrics_record(**fields), indent=2).encode())
    return path
