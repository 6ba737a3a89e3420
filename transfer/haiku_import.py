"""Checkpoints of the official JAX code (deepmind/ssl_hsic, and BYOL in deepmind-research) as
torchvision ResNets.

The released files, as their code writes them (docs/export.md lists the sources, file and line):
* SSL-HSIC (ssl_hsic/experiment.py): `np.save` (a pickle inside the .npy format) of
      {"experiment_state": _ExperimentState._asdict(), "ema_state": _EMAState._asdict()}
  `_asdict()` is shallow: the parameters and state are haiku 0.0.5 `FlatMapping`s, `kernel_opt_state` is optax
  0.1.0's (ScaleByAdamState(count, mu, nu), EmptyState()) and `opt_state` BYOL's LARS chain
  (AddWeightDecayState(), ScaleByLarsState(mu), EmptyState()). The official linear evaluation takes
  ema_state.online_params with experiment_state.online_state.
* BYOL (byol/utils/checkpointing.py): `dill.dump(..., protocol=2)` of
      {"experiment_state": _ByolExperimentState(online_params, target_params, online_state, target_state,
                                                 opt_state), "step": int, "rng": array}
  (pretrain_res50x1.pkl, pretrain_res200x2.pkl and the ablation files); BYOL's evaluation
  (byol/eval_experiment.py) takes experiment_state.online_params with online_state: BYOL keeps no EMA of the
  online network besides the target.
* a plain haiku dict ({"params": ..., "state": ...}, or both merged).
`transfer.backbone`'s restricted unpickler reads them without importing or calling anything of the file: haiku's
mappings become dicts, and the NamedTuples of optax / BYOL / ssl_hsic inert `ForeignRecord`s of
their fields.

Names (the network's module path up to `initial_conv` is found, whatever the outer module is called;
the same at every depth and width_multiplier, which only scales the channels):
    initial_conv                          -> conv1          (HWIO -> OIHW)
    initial_batchnorm                     -> bn1            (scale, offset; state mean_ema / var_ema average)
    block_group_g/~/block_b/~/conv_k      -> layer{g+1}.{b}.conv{k+1}
    block_group_g/~/block_b/~/batchnorm_k -> layer{g+1}.{b}.bn{k+1}
    block_group_g/~/block_b/~/shortcut_conv / shortcut_batchnorm -> downsample.0 / downsample.1

Padding: haiku pads "SAME" as TensorFlow does, which at stride 2 puts the extra row and column at
the end (a 7x7 stride-2 convolution of a 224 image pads 2 before and 3 after; torchvision pads 3 and
3). A torchvision ResNet with these weights would see its input shifted by one pixel at every
strided layer, so the imported backbone carries `padding="same"` and `same_padding_` rebuilds those
layers to pad as TensorFlow does."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import UserError
from transfer.backbone import ForeignRecord

TORSO_START = re.compile(r"^(.*?)initial_conv$")
BLOCK = re.compile(r"^block_group_(\d+)/~/block_(\d+)/~/(conv|batchnorm)_(\d+)$")
SHORTCUT = re.compile(r"^block_group_(\d+)/~/block_(\d+)/~/shortcut_(conv|batchnorm)$")

# The fields of the released NamedTuples, in order (a protocol-2 pickle of a NamedTuple holds its
# values only).
RELEASED_FIELDS: dict[str, tuple[str, ...]] = {
    # deepmind-research byol/byol_experiment.py:45-51
    "byol.byol_experiment._ByolExperimentState": (
        "online_params",
        "target_params",
        "online_state",
        "target_state",
        "opt_state",
    ),
    # deepmind/ssl_hsic ssl_hsic/experiment.py:50-66
    "ssl_hsic.experiment._ExperimentState": (
        "online_params",
        "target_params",
        "online_state",
        "target_state",
        "kernel_params",
        "kernel_opt_state",
        "opt_state",
    ),
    "ssl_hsic.experiment._EMAState": ("online_params", "kernel_params", "ema_params", "ema_state"),
    # optax 0.1.0 optax/_src/transform.py:260-264, optax/_src/base.py:59
    "optax._src.transform.ScaleByAdamState": ("count", "mu", "nu"),
    "optax._src.base.EmptyState": (),
    # deepmind-research byol/utils/optimizers.py:57-58, 108-109
    "byol.utils.optimizers.ScaleByLarsState": ("mu",),
    "byol.utils.optimizers.AddWeightDecayState": (),
}
_BY_QUALNAME = {path.rsplit(".", 1)[1]: fields for path, fields in RELEASED_FIELDS.items()}


def _mapping(value: Any) -> dict | None:
    """A dict as is; a NamedTuple record of the file (`ForeignRecord`) as {field: value} where its
    fields are known
    (from dill's record of the class, or RELEASED_FIELDS by module path, or by class name); else
    None."""
    if isinstance(value, dict):
        return value
    if isinstance(value, ForeignRecord):
        fields = value.fields or _BY_QUALNAME.get(value.source.rsplit(".", 1)[-1])
        if fields is not None and len(fields) == len(value):
            return {
                **dict(zip(fields, value)),
                **value.kwargs,
                **(value.state if isinstance(value.state, dict) else {}),
            }
    return None


def is_haiku_layout(raw: Any) -> bool:
    """A dict of haiku module paths (".../~/initial_conv"), or an official experiment's
    checkpoint."""
    if not isinstance(raw, dict):
        return False
    if _mapping(raw.get("experiment_state")) is not None:
        return True
    flat = _modules(raw)
    return any(TORSO_START.match(name) for name in flat)


def _modules(tree: Any) -> dict[str, dict]:
    """{module path: {parameter or state name: value}}: haiku's two-level dicts, found at any
    depth."""
    found = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            if (
                isinstance(value, dict)
                and value
                and all(isinstance(v, np.ndarray) for v in value.values())
            ):
                found[key] = value  # a module: a flat dict of arrays
            elif isinstance(value, dict):
                found.update(_modules(value))
    return found


def haiku_tree(raw: dict, weights: str) -> tuple[dict[str, dict], str, str]:
    """(parameters and state merged, layout description, the network taken) of the network `weights`
    names.

    SSL-HSIC: `ema` (the default) is ema_state.online_params with experiment_state.online_state, as
    its linear evaluation; `online` / `target` that network's parameters and state. BYOL: `ema` is
    the online network, what BYOL's evaluation takes (BYOL's EMA is its target network: `target`
    asks for that)."""
    experiment = _mapping(raw.get("experiment_state"))
    if experiment is None:
        merged = {**_modules(raw.get("params", raw)), **_modules(raw.get("state", {}))}
        return merged, "haiku parameters", "as-is"
    ssl_hsic = "ema_state" in raw or "kernel_params" in experiment
    network = {
        "ema": "online",
        "online": "online",
        "target": "target",
        "teacher": "target",
        "student": "online",
    }.get(weights, "online")
    if ssl_hsic and weights == "ema":
        params = (_mapping(raw.get("ema_state")) or {}).get("online_params")
        if params is None:
            raise UserError(
                "the checkpoint has no ema_state.online_params (the EMA network the official "
                "evaluation "
                "uses); choose --weights online or target"
            )
        taken = "ema"
    else:
        params = experiment.get(f"{network}_params")
        if params is None:
            raise UserError(
                f"the checkpoint has no experiment_state.{network}_params; choose another --weights"
            )
        taken = network
    state = experiment.get(f"{network}_state") or {}
    record = type(raw.get("experiment_state")).__name__
    if ssl_hsic:
        layout = (
            f"SSL-HSIC checkpoint (experiment_state / ema_state), "
            f"{'ema_state.online_params' if taken == 'ema' else f'experiment_state.{network}_params'}"
            f" with experiment_state.{network}_state"
        )
    else:
        kind = (
            f"BYOL checkpoint ({record})"
            if record != "dict"
            else "BYOL-style checkpoint (experiment_state)"
        )
        layout = f"{kind}, experiment_state.{network}_params with {network}_state"
    return {**_modules(params), **_modules(state)}, layout, taken


def _array(value: Any, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise UserError(f"haiku entry {name} is a {type(value).__name__}, not an array")
    return value


def _average(tree: dict, module: str, which: str) -> np.ndarray:
    """A BatchNorm statistic: haiku keeps it in the state module <bn>/~/<which>_ema as `average`."""
    state = tree.get(f"{module}/~/{which}_ema")
    if state is None or "average" not in state:
        raise UserError(
            f"haiku state {module}/~/{which}_ema is missing: the checkpoint holds no BatchNorm "
            f"statistics "
            "(the network state); both parameters and state are needed"
        )
    return _array(state["average"], f"{module}/~/{which}_ema").reshape(-1)


def torchvision_layout(names: Any) -> dict[str, tuple[str, str]]:
    """{torchvision module (conv1, layer2.0.downsample.1 ...): (haiku module path, "conv" |
    "batchnorm")} for the
    ResNet torso among the haiku module paths `names` (see the module docstring); the same at any
    depth and width."""
    starts = sorted({m.group(1) for name in names if (m := TORSO_START.match(name))})
    if len(starts) != 1:
        raise UserError(
            "expected one ResNet torso (a module path ending in initial_conv) in the haiku tree, "
            f"found "
            f"{len(starts)}: {starts[:3]}"
        )
    prefix = starts[0]
    layout: dict[str, tuple[str, str]] = {}
    for name in names:
        if not name.startswith(prefix) or "_ema" in name:
            continue
        relative = name[len(prefix) :]
        if relative == "initial_conv":
            layout["conv1"] = (name, "conv")
        elif relative == "initial_batchnorm":
            layout["bn1"] = (name, "batchnorm")
        elif m := BLOCK.match(relative):
            group, block, kind, index = (
                int(m.group(1)),
                int(m.group(2)),
                m.group(3),
                int(m.group(4)),
            )
            layout[f"layer{group + 1}.{block}.{'conv' if kind == 'conv' else 'bn'}{index + 1}"] = (
                name,
                kind,
            )
        elif m := SHORTCUT.match(relative):
            group, block, kind = int(m.group(1)), int(m.group(2)), m.group(3)
            layout[f"layer{group + 1}.{block}.downsample.{0 if kind == 'conv' else 1}"] = (
                name,
                "conv" if kind == "conv" else "batchnorm",
            )
    return layout


def to_torchvision(tree: dict[str, dict]) -> dict[str, Tensor]:
    """The torchvision names and layouts of the ResNet torso in a haiku tree (see the module
    docstring)."""
    out: dict[str, Tensor] = {}
    for target, (module, kind) in torchvision_layout(tree).items():
        if kind == "conv":
            weight = _array(tree[module]["w"], module)  # [kh, kw, in, out]
            out[f"{target}.weight"] = torch.from_numpy(
                np.ascontiguousarray(weight.transpose(3, 2, 0, 1))
            ).float()
            continue
        entry = tree[module]
        out[f"{target}.weight"] = torch.from_numpy(
            _array(entry["scale"], module).reshape(-1).copy()
        ).float()
        out[f"{target}.bias"] = torch.from_numpy(
            _array(entry["offset"], module).reshape(-1).copy()
        ).float()
        out[f"{target}.running_mean"] = torch.from_numpy(
            _average(tree, module, "mean").copy()
        ).float()
        out[f"{target}.running_var"] = torch.from_numpy(
            _average(tree, module, "var").copy()
        ).float()
        out[f"{target}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


# ------------------------------------------------------------------------------------------ padding


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) along one axis: out = ceil(size / stride), and the
    total
    max((out - 1) stride + (kernel - 1) dilation + 1 - size, 0) split with the odd one after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d that pads as TensorFlow's SAME (the same parameters, so state dicts are
    unchanged)."""

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = same_padding(
            x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0]
        )
        left, right = same_padding(
            x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1]
        )
        return F.conv2d(
            F.pad(x, (left, right, top, bottom)),
            self.weight,
            self.bias,
            self.stride,
            0,
            self.dilation,
            self.groups,
        )


class MaxPool2dSame(nn.MaxPool2d):
    """Max pooling with TensorFlow's SAME padding (padded values never win: -inf)."""

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = same_padding(x.shape[-1], self.kernel_size, self.stride)
        return F.max_pool2d(
            F.pad(x, (left, right, top, bottom), value=-math.inf), self.kernel_size, self.stride
        )


def same_padding_(model: nn.Module) -> nn.Module:
    """Make every convolution and the stem's max pooling of a torchvision ResNet pad as
    TensorFlow's SAME."""
    for name, child in model.named_children():
        if isinstance(child, nn.Conv2d) and not isinstance(child, Conv2dSame):
            same = Conv2dSame(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                child.stride,
                0,
                child.dilation,
                child.groups,
                child.bias is not None,
            )
            same.weight = child.weight
            if child.bias is not None:
                same.bias = child.bias
            setattr(model, name, same)
        elif isinstance(child, nn.MaxPool2d) and not isinstance(child, MaxPool2dSame):
            setattr(model, name, MaxPool2dSame(child.kernel_size, child.stride))
        else:
            same_padding_(child)
    return model
