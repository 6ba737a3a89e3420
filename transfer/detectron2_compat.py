"""Import detectron2, with shims for running detectron2 v0.6 on today's stack. All shims live here.

Each shim is applied only when the installed detectron2 needs it, so an upstream detectron2 built from source
(the normal install on a cluster) runs untouched. Call `import_detectron2()` before any detectron2 import.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import types

log = logging.getLogger(__name__)
_applied: list[str] | None = None
_has_compiled_ops: bool | None = None


class _MissingCompiledOps(types.ModuleType):
    """Stands in for detectron2._C when detectron2 was built without its C++/CUDA extension.

    v0.6 imports _C at module level in layers/deform_conv.py and rotated_boxes.py, so without it nothing in
    detectron2.layers imports, although Faster / Mask R-CNN never call it (they run on torchvision ops).
    Any use says what is missing; hasattr() sees no attribute, so feature checks fall back cleanly.
    """

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"detectron2._C.{name} is unavailable: this detectron2 was built without its C++ ops "
                             "(deformable conv, rotated boxes, fast COCO eval); build detectron2 from source for them")


def _detectron2_version() -> str:
    spec = importlib.util.find_spec("detectron2")
    if spec is None:
        from pretrain.errors import UserError
        raise UserError("detectron2 is not installed: run scripts/install.sh (or build detectron2 from source)")
    with open(spec.submodule_search_locations[0] + "/__init__.py") as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip("'\"")
    return "unknown"


def apply_shims() -> list[str]:
    """Patch what detectron2 <= 0.6 needs from older Pillow / numpy; return the names of the shims applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = []
    global _has_compiled_ops
    _has_compiled_ops = importlib.util.find_spec("detectron2._C") is not None
    if not _has_compiled_ops:
        sys.modules["detectron2._C"] = _MissingCompiledOps("detectron2._C")
        _applied.append("detectron2._C")
    if _detectron2_version() != "0.6":
        return _applied
    import numpy as np
    from PIL import Image

    # v0.6's data/transforms/transform.py uses Image.LINEAR as a default argument, so importing it fails on
    # Pillow >= 10, which removed the alias. Upstream detectron2 uses Image.BILINEAR since 2023.
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR
        _applied.append("PIL.Image.LINEAR")
    # v0.6 uses np.int / np.float / np.bool (data/build.py, evaluation/*, structures/masks.py), aliases that
    # numpy 1.24 removed. Upstream replaced them with the builtins in 2023.
    for alias, builtin in (("int", int), ("float", float), ("bool", bool)):
        if alias not in np.__dict__:
            setattr(np, alias, builtin)
            _applied.append(f"numpy.{alias}")
    if _applied:
        log.debug("detectron2 %s: applied compatibility shims %s", _detectron2_version(), _applied)
    return _applied


def has_compiled_ops() -> bool:
    """True when detectron2._C (its C++/CUDA extension) was built."""
    apply_shims()
    return bool(_has_compiled_ops)


def import_detectron2():
    """Apply the shims if needed, then import and return the detectron2 package."""
    apply_shims()
    import detectron2
    return detectron2
