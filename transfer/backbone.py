"""Any supported checkpoint -> the canonical backbone: a torchvision ResNet state_dict without fc,
loaded strictly.

Accepted inputs (the layout is detected):
* this project's pretraining checkpoints (the EMA network by default; `weights="online"` or
  `"target"`),
* plain torchvision state_dicts (.pth / .pt, or .safetensors), with or without fc,
* common SSL layouts: wrappers {"state_dict": ...} / {"model": ...}, and prefixes such as module.,
  encoder., backbone., module.encoder_q., online_network.encoder. ...,
* detectron2 .pkl files in the layout `transfer.export` writes (read with a restricted unpickler).

Checkpoints are untrusted: torch.load(weights_only=True), safetensors, or a pickle reader that
admits only numpy arrays and plain containers. Any missing or unexpected backbone key is an error
listing them."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.errors import UserError
from pretrain import checkpoint
from pretrain.networks import ARCHITECTURES, build_resnet
from transfer.names import split_named

PREFIXES = (
    "",
    "module.",
    "encoder.",
    "backbone.",
    "model.",
    "module.encoder.",
    "module.backbone.",
    "module.encoder_q.",
    "encoder_q.",
    "online_network.encoder.",
    "module.online_network.encoder.",
    "online_network.",
    "student.backbone.",
    "teacher.backbone.",
    "module.base_encoder.",
    "base_encoder.",
    "net.",
    "trunk.",
    "encoder.backbone.",
    "_feature_blocks.",
    "trunk._feature_blocks.",
    "trunk.base_model._feature_blocks.",
)
CONTAINER_KEYS = (
    "state_dict",
    "model",
    "model_state",
    "model_state_dict",
    "network",
    "teacher",
    "student",
)
# What the importer reads (docs/export.md "What the importer accepts" has each with its test).
LAYOUTS = (
    "this project's pretraining checkpoint",
    "SSL-HSIC's checkpoint.npy (experiment_state / ema_state)",
    "BYOL's dill pickle (pretrain_res50x1.pkl, res200x2 ...)",
    "haiku parameter dicts",
    "torchvision state_dicts (V1 / V2 weights)",
    "detectron2 pickles",
    "VISSL (classy_state_dict trunk)",
    "MMPretrain / MMSelfSup (state_dict with meta, backbone.)",
    "SimCLR converted to PyTorch (state_dict)",
    "MoCo / DINO / timm / BYOL-PyTorch training checkpoints",
)
BACKBONE_KEY = re.compile(r"^(conv1\.|bn1\.|layer[1-4]\.)")


@dataclass
class Backbone:
    """A canonical backbone and where it came from."""

    state_dict: dict[str, Tensor]
    arch: str
    source: str
    layout: (
        str  # how it was found, e.g. "ssl-hsic checkpoint (ema)" or "prefix 'module.encoder_q.'"
    )
    weights: str  # ema | online | target | student | teacher | as-is
    # torch: torchvision's symmetric padding; same: TensorFlow's SAME (JAX checkpoints)
    padding: str = "torch"
    # how reports call it (transfer.names: NAME=PATH, or derived from the path)
    name: str = ""

    def model(self) -> torch.nn.Module:
        """A torchvision ResNet (fc = Identity) holding these weights, padding as the network was
        trained."""
        model = build_resnet(self.arch, self.state_dict)
        if self.padding == "same":
            from transfer.haiku_import import same_padding_

            same_padding_(model)
        return model


def detect_arch(state_dict: dict[str, Tensor]) -> str | None:
    """The ResNet of the table whose block type, stage depths and width (the stem's channels /
    64) match, or None."""
    block = "bottleneck" if any(k.endswith("conv3.weight") for k in state_dict) else "basic"
    depths = []
    for stage in range(1, 5):
        indices = {
            int(m.group(1)) for k in state_dict if (m := re.match(rf"layer{stage}\.(\d+)\.", k))
        }
        depths.append(max(indices) + 1 if indices else 0)
    stem = state_dict.get("conv1.weight")
    width = stem.shape[0] // 64 if stem is not None and stem.dim() == 4 else 1
    for name, arch in ARCHITECTURES.items():
        if (arch.block, arch.layers, arch.width) == (block, tuple(depths), width):
            return name
    return None


# ------------------------------------------------------------------------------------------ reading

# Modules whose globals are never taken as data records: the standard library (os.system,
# builtins.exec, subprocess.Popen ...), and the libraries whose few safe globals are listed by name
# below.
_NEVER_RECORDS = frozenset(sys.stdlib_module_names) | {
    "builtins",
    "__builtin__",
    "__main__",
    "numpy",
    "torch",
    "dill",
    "jax",
    "jaxlib",
}
_CLASS_NAME = re.compile(r"_*[A-Z]\w*(\.\w+)*")


class ForeignRecord(tuple):
    """An instance of a class that a checkpoint names and this project does not have (optax's
    ScaleByAdamState, BYOL's _ByolExperimentState ...): only its fields, as the pickle gives them.
    Its class is never imported and nothing of it is called. The positional fields are the tuple;
    `fields` names them where known (from dill's
    namedtuple record, or `haiku_import.RELEASED_FIELDS`); `state` is what the pickle's BUILD set,
    if anything."""

    source = ""  # module.qualname as the pickle names it
    fields: tuple[str, ...] | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> "ForeignRecord":
        record = tuple.__new__(cls, args)
        record.kwargs, record.state = kwargs, None
        return record

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # record.online_params, as the released code reads its NamedTuples
    def __getattr__(self, name: str) -> Any:
        fields = type(self).fields or ()
        if name in fields:
            return self[fields.index(name)]
        raise AttributeError(f"{self.source} record has no field {name!r} (fields: {fields})")

    def as_dict(self) -> dict[str, Any]:
        """{field: value}: the named positional fields, keyword fields and a dict state."""
        named = dict(zip(self.fields or (), self))
        return {**named, **self.kwargs, **(self.state if isinstance(self.state, dict) else {})}

    def __repr__(self) -> str:
        return f"<record {self.source}{tuple(self)!r}>"


def _record_class(
    module: str, qualname: str, fields: tuple[str, ...] | None = None
) -> type[ForeignRecord]:
    from transfer.haiku_import import RELEASED_FIELDS

    fields = tuple(fields) if fields else RELEASED_FIELDS.get(f"{module}.{qualname}")
    return type(
        qualname.rsplit(".", 1)[-1],
        (ForeignRecord,),
        {"source": f"{module}.{qualname}", "fields": fields, "__module__": __name__},
    )


class _ModuleName(str):
    """dill's _import_module(name), kept as the name: the module is never imported."""


def _haiku_mapping(data: Any = ()) -> dict:
    """haiku's FlatMapping / FlatMap / frozendict pickle as (class, (mapping,)): read as the dict
    they hold."""
    if not isinstance(data, dict):
        raise pickle.UnpicklingError(
            f"a haiku mapping of a {type(data).__name__} is not a weights mapping"
        )
    return dict(data)


def _latin1_bytes(text: Any, encoding: str = "latin1") -> bytes:
    """_codecs.encode as pickle protocol 2 writes bytes (dill's checkpoints use it): latin-1 text
    to bytes only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing _codecs.encode other than of latin-1 text")
    return text.encode("latin1")


class _SafeUnpickler(pickle.Unpickler):
    """Admits numpy arrays, numpy scalars and plain containers, and reads what the released JAX
    checkpoints name: haiku's mappings as dicts, dill's array / namedtuple / module helpers by safe
    equivalents, and instances of classes this project does not have (optax's, BYOL's) as inert
    `ForeignRecord`s. Nothing from the file is ever imported or called: the one thing it may call is
    numpy's array reconstruction. Every other global of
    the standard library, builtins, numpy, torch or dill, and every name that is not a class name,
    is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core._multiarray_umath", "_reconstruct"),
        ("numpy._core._multiarray_umath", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
    }
    HAIKU_MAPPINGS = {
        ("haiku._src.data_structures", name)
        for name in ("FlatMapping", "FlatMap", "frozendict", "FrozenDict")
    }
    SAFE_TYPES = {
        "dict": dict,
        "list": list,
        "tuple": tuple,
        "set": set,
        "frozenset": frozenset,
        "bytes": bytes,
        "str": str,
        "int": int,
        "float": float,
        "complex": complex,
        "bool": bool,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._records: dict[str, type[ForeignRecord]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if (module, name) in self.HAIKU_MAPPINGS:
            return _haiku_mapping
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if module in ("dill._dill", "dill.dill") and name in (
            "_create_array",
            "_create_namedtuple",
            "_import_module",
            "_get_attr",
            "_load_type",
        ):
            return getattr(self, f"_dill{name}")
        if module.split(".")[0] not in _NEVER_RECORDS and _CLASS_NAME.fullmatch(name):
            return self._record(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a weights pickle holds only numpy "
            "arrays and plain containers"
        )

    def _record(
        self, module: str, qualname: str, fields: tuple[str, ...] | None = None
    ) -> type[ForeignRecord]:
        key = f"{module}.{qualname}"
        if key not in self._records or (fields and not self._records[key].fields):
            self._records[key] = _record_class(module, qualname, fields)
        return self._records[key]

    # dill's helpers (dill._dill), as dill writes BYOL's checkpoints; none imports or calls anything
    # of the file
    def _dill_create_array(self, f: Any, args: tuple, state: Any, npdict: Any = None) -> Any:
        if f is not _numpy_reconstruct() or npdict:
            raise pickle.UnpicklingError(
                "refusing dill._dill._create_array of anything but a plain numpy array"
            )
        array = f(*args)
        array.__setstate__(state)
        return array

    def _dill_create_namedtuple(
        self, name: str, fieldnames: Any, modulename: str
    ) -> type[ForeignRecord]:
        if not _CLASS_NAME.fullmatch(str(name)):
            raise pickle.UnpicklingError(
                f"refusing dill._dill._create_namedtuple of {modulename}.{name}"
            )
        return self._record(str(modulename), str(name), tuple(str(f) for f in fieldnames))

    def _dill_import_module(self, name: str, safe: bool = False) -> _ModuleName:
        return _ModuleName(name)

    def _dill_get_attr(self, module: Any, name: str) -> Any:
        if not isinstance(module, _ModuleName):
            raise pickle.UnpicklingError(
                f"refusing dill._dill._get_attr of {name} on a {type(module).__name__}"
            )
        return self.find_class(str(module), name)

    def _dill_load_type(self, name: str) -> type:
        if name not in self.SAFE_TYPES:
            raise pickle.UnpicklingError(f"refusing to load dill._dill._load_type({name!r})")
        return self.SAFE_TYPES[name]


def _numpy_reconstruct() -> Any:
    """numpy's ndarray reconstruction function (numpy 2 moved it to numpy._core)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def read_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return _SafeUnpickler(f, encoding="latin1").load()


def read_npy(path: Path) -> Any:
    """An .npy file; one holding a pickled object (np.save of a dict, as the official JAX code saves
    its
    checkpoints) goes through the restricted unpickler, never numpy's."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        reader = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = reader(f)
        if not dtype.hasobject:
            return np.load(path, allow_pickle=False)
        content = _SafeUnpickler(f, encoding="latin1").load()
    return content.item() if isinstance(content, np.ndarray) and content.shape == () else content


def unpickling_message(path: Path, error: Exception) -> str:
    """One line for a file torch.load(weights_only=True) refused: bytes that are no pickle at all,
    or a pickle that
    would run code (a global outside the admitted ones)."""
    text = " ".join(str(error).split())
    # our own pickle reader's refusal: already one short line
    if "WeightsUnpickler error: " not in text:
        return f"checkpoint {path} cannot be read safely: {text}"
    detail = text.split("WeightsUnpickler error: ", 1)[1].split(" Check the documentation", 1)[0]
    if "Unsupported global" in detail:
        return f"checkpoint {path} cannot be read safely (loading it would run code from the file): {detail[:160]}"
    return (
        f"checkpoint {path} is not a checkpoint ({detail[:80]}); expected a file written by "
        f"torch.save, "
        ".safetensors, .npy or .pkl"
    )


def read_checkpoint(path: str | Path) -> Any:
    """The raw content of a checkpoint file, read without running any code from it. torch files may
    hold an
    argparse.Namespace (DINO's and timm's training checkpoints keep their arguments there): admitted
    as data."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if path.suffix == ".pkl":
            return read_pickle(path)
        if path.suffix == ".npy":
            return read_npy(path)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(unpickling_message(path, error)) from None
    except Exception as error:  # truncated or not a checkpoint at all
        detail = " ".join(str(error).split())[:160]
        raise UserError(
            f"checkpoint {path} is unreadable (truncated or not a checkpoint): "
            f"{type(error).__name__}: {detail}"
        ) from None


def from_detectron2(model: dict[str, Any]) -> dict[str, Tensor]:
    """Invert the detectron2 renames of `transfer.export.to_detectron2`."""
    out = {}
    for key, value in model.items():
        k = key.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
        k = re.sub(r"conv(\d)\.norm", r"bn\1", k)
        k = re.sub(r"res([2-5])", lambda m: f"layer{int(m.group(1)) - 1}", k)
        k = k[len("stem.") :] if k.startswith("stem.") else k
        out[k] = torch.as_tensor(np.asarray(value))
    return out


def _tensors_only(mapping: dict) -> dict[str, Tensor]:
    return {k: v for k, v in mapping.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _container(raw: dict, weights: str) -> tuple[str | None, str]:
    """The entry holding the network `weights` names: DINO's teacher (its EMA network, what DINO
    evaluates;
    the default) or student, timm's state_dict_ema or state_dict, else the first of CONTAINER_KEYS.
    """
    choices = {
        "ema": ("teacher", "state_dict_ema"),
        "teacher": ("teacher",),
        "student": ("student",),
        "online": ("student",),
    }.get(weights, ())
    for key in (*choices, *CONTAINER_KEYS):
        if isinstance(raw.get(key), dict) and _tensors_only(raw[key]):
            return key, {"teacher": "teacher", "student": "student", "state_dict_ema": "ema"}.get(
                key, "as-is"
            )
    return None, "as-is"


def _vissl_trunk(raw: dict) -> dict | None:
    """VISSL's training checkpoint: the trunk's weights under
    classy_state_dict.base_model.model.trunk
    (vissl/utils/checkpoint.py), keys `_feature_blocks.conv1.weight` ...; None if the file is not
    one."""
    node: Any = raw.get("classy_state_dict")
    for key in ("base_model", "model", "trunk"):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def _candidates(raw: Any, weights: str) -> tuple[dict[str, Tensor], str, str, str]:
    """(flat state_dict, layout description, weights, padding) before prefix detection."""
    from transfer import haiku_import

    if not isinstance(raw, dict):
        raise UserError(
            f"a checkpoint must hold a mapping of weights, not a {type(raw).__name__}; tried the "
            f"layouts: {'; '.join(LAYOUTS)}"
        )
    if checkpoint.is_pretrain_checkpoint(raw):
        return (
            checkpoint.backbone_state(raw, weights),
            f"ssl-hsic checkpoint ({weights})",
            weights,
            "torch",
        )
    if haiku_import.is_haiku_layout(raw):
        tree, layout, taken = haiku_import.haiku_tree(raw, weights)
        return haiku_import.to_torchvision(tree), layout, taken, "same"
    if isinstance(raw.get("model"), dict) and ("matching_heuristics" in raw or "__author__" in raw):
        return from_detectron2(raw["model"]), "detectron2 pickle", "as-is", "torch"
    if (trunk := _vissl_trunk(raw)) is not None:
        return (
            _tensors_only(trunk),
            "VISSL checkpoint (classy_state_dict.base_model.model.trunk)",
            "as-is",
            "torch",
        )
    key, taken = _container(raw, weights)
    if key is not None:
        return _tensors_only(raw[key]), f"'{key}' entry", taken, "torch"
    return _tensors_only(raw), "top level", "as-is", "torch"


def _strip_best_prefix(
    state: dict[str, Tensor], weights: str = "ema"
) -> tuple[dict[str, Tensor], str]:
    """The prefix that leaves the most backbone keys. When a flat checkpoint holds both DINO
    networks
    (student.backbone. and teacher.backbone.), the teacher unless `weights` is student / online."""
    found = {}
    for prefix in PREFIXES:
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        found[prefix] = {k: v for k, v in stripped.items() if BACKBONE_KEY.match(k)}
    if found["student.backbone."] and found["teacher.backbone."]:
        prefix = "student.backbone." if weights in ("student", "online") else "teacher.backbone."
        return found[prefix], prefix
    best_prefix = max(PREFIXES, key=lambda p: len(found[p]))  # the first of the longest
    return found[best_prefix], best_prefix


def describe_non_resnet(state: dict[str, Tensor]) -> str | None:
    """What a state dict that is not a ResNet looks like, from its key names, or None."""
    keys = list(state)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, k) for k in keys)

    if has(r"(^|\.)(cls_token|pos_embed)$") or has(r"patch_embed\."):
        blocks = {int(m.group(1)) for k in keys if (m := re.search(r"blocks\.(\d+)\.", k))}
        width = next(
            (
                tuple(v.shape)[-1]
                for k, v in state.items()
                if k.endswith(("cls_token", "pos_embed"))
            ),
            None,
        )
        return f"a Vision Transformer ({len(blocks)} blocks{f', width {width}' if width else ''})"
    if has(r"relative_position_bias_table"):
        return "a Swin Transformer"
    if has(r"dwconv\.") or has(r"downsample_layers\."):
        return "a ConvNeXt"
    if has(r"conv_stem\.") or has(r"conv_dw\."):
        return "an EfficientNet / MobileNet"
    if has(r"^(module\.)?features\.\d+\.weight$"):
        return "a VGG / AlexNet-style network"
    return None


def load_backbone(path: str | Path, weights: str = "ema", arch: str | None = None) -> Backbone:
    """Read any supported checkpoint into the canonical form; strict, or a UserError that says
    why not."""
    raw = read_checkpoint(path)
    state, container, taken, padding = _candidates(raw, weights)
    backbone, prefix = _strip_best_prefix(state, weights)
    tried = ", ".join(repr(p) for p in PREFIXES)
    if "conv1.weight" not in backbone:
        if (other := describe_non_resnet(state)) is not None:
            raise UserError(
                f"{path}: looks like {other}, not a ResNet; this platform evaluates "
                f"torchvision-style "
                f"ResNets ({', '.join(ARCHITECTURES)})"
            )
        sample = ", ".join(list(state)[:5]) or "(no tensors)"
        head = {"fc", "head", "classifier"}
        what = (
            "only a classifier head"
            if state and all(head & set(k.split(".")[:-1]) for k in state)
            else "no ResNet backbone"
        )
        raise UserError(
            f"{path}: unknown layout, {what} found (keys: {sample}; {len(state)} tensors); tried "
            f"the "
            f"layouts: {'; '.join(LAYOUTS)} (containers {', '.join(CONTAINER_KEYS)}; "
            f"prefixes {tried})"
        )
    detected = detect_arch(backbone)
    arch = arch or detected
    if arch not in ARCHITECTURES:
        raise UserError(
            f"{path}: the backbone keys match no torchvision ResNet (stage depths do not fit "
            f"{', '.join(ARCHITECTURES)}); pass a checkpoint of one of them"
        )
    expected = build_resnet(arch).state_dict()
    for key in set(expected) - set(backbone):
        # BN's step counter: no weight, absent from many layouts
        if key.endswith("num_batches_tracked"):
            backbone[key] = torch.tensor(0, dtype=torch.long)
    missing = sorted(set(expected) - set(backbone))
    unexpected = sorted(set(backbone) - set(expected))
    shapes = sorted(
        k for k in set(expected) & set(backbone) if expected[k].shape != backbone[k].shape
    )
    if missing or unexpected or shapes:

        def listing(keys: list[str]) -> str:
            return f"{len(keys)} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"

        raise UserError(
            f"{path} does not load strictly into {arch} (found as {container}, prefix {prefix!r}; "
            f"looks like {detected or 'no known ResNet'}): missing {listing(missing)}, "
            f"unexpected "
            f"{listing(unexpected)}, wrong shape {listing(shapes)}"
        )
    layout = container + (f", prefix '{prefix}'" if prefix else "")
    if prefix in ("student.backbone.", "teacher.backbone."):
        taken = prefix.split(".")[0]
    canonical = {
        k: backbone[k].detach().clone(memory_format=torch.contiguous_format) for k in expected
    }
    return Backbone(canonical, arch, str(Path(path).resolve()), layout, taken, padding)


def fingerprint(state_dict: dict[str, Tensor]) -> str:
    """sha256 of the tensors themselves (names, shapes, dtypes, bytes): equal for the same
    weights in any format."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        if key.endswith("num_batches_tracked"):
            continue
        tensor = state_dict[key].detach().cpu()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        # reshape(-1): a channels_last [N, C, 1, 1] weight counts as contiguous yet has stride(-1) =
        # C
        digest.update(
            tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            if tensor.numel()
            else b""
        )
    return digest.hexdigest()


def resolve_backbone(spec: str, seed: int = 0, weights: str = "ema") -> Backbone:
    """`[NAME=]PATH`, or `[NAME=]random:ARCH` for the same network at random init (seeded): the
    baseline."""

    name, spec = split_named(spec)
    if spec.startswith("random:"):
        arch = spec.split(":", 1)[1]
        if arch not in ARCHITECTURES:
            raise UserError(
                f"unknown architecture in '{spec}'; use random:ARCH with ARCH one of "
                f"{', '.join(ARCHITECTURES)}"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = build_resnet(arch).state_dict()
        return Backbone(state, arch, spec, "random init", "random", name=name)
    return dataclasses.replace(load_backbone(spec, weights), name=name)
