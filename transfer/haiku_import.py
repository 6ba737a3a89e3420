"""Checkpoints of the official JAX code (deepmind/ssl_hsic, and BYOL in deepmind-research) as torchvision ResNets.

Those checkpoints are `np.save`d dicts (a pickle inside the .npy format) of haiku parameters and state:
    {"experiment_state": {"online_params", "online_state", "target_params", "target_state", ...},
     "ema_state": {"online_params", ...}}
(the official linear evaluation takes ema_state.online_params with experiment_state.online_state). A plain
haiku dict ({"params": ..., "state": ...}, or both merged) is read too. The file is unpickled by
`transfer.backbone`'s restricted unpickler: numpy arrays and plain containers only, so no code runs.

Names (the network's module path up to `initial_conv` is found, whatever the outer module is called):
    initial_conv                          -> conv1          (HWIO -> OIHW)
    initial_batchnorm                     -> bn1            (scale, offset; state mean_ema / var_ema average)
    block_group_g/~/block_b/~/conv_k      -> layer{g+1}.{b}.conv{k+1}
    block_group_g/~/block_b/~/batchnorm_k -> layer{g+1}.{b}.bn{k+1}
    block_group_g/~/block_b/~/shortcut_conv / shortcut_batchnorm -> downsample.0 / downsample.1

Padding: haiku pads "SAME" as TensorFlow does, which at stride 2 puts the extra row and column at the end
(a 7x7 stride-2 convolution of a 224 image pads 2 before and 3 after; torchvision pads 3 and 3). A torchvision
ResNet with these weights would see its input shifted by one pixel at every strided layer, so the imported
backbone carries `padding="same"` and `same_padding_` rebuilds those layers to pad as TensorFlow does.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.errors import UserError

TORSO_START = re.compile(r"^(.*?)initial_conv$")
BLOCK = re.compile(r"^block_group_(\d+)/~/block_(\d+)/~/(conv|batchnorm)_(\d+)$")
SHORTCUT = re.compile(r"^block_group_(\d+)/~/block_(\d+)/~/shortcut_(conv|batchnorm)$")


def is_haiku_layout(raw: Any) -> bool:
    """A dict of haiku module paths (".../~/initial_conv"), or the official experiment's checkpoint."""
    if not isinstance(raw, dict):
        return False
    if isinstance(raw.get("experiment_state"), dict):
        return True
    flat = _modules(raw)
    return any(TORSO_START.match(name) for name in flat)


def _modules(tree: Any) -> dict[str, dict]:
    """{module path: {parameter or state name: value}}: haiku's two-level dicts, found at any depth."""
    found = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
                found[key] = value  # a module: a flat dict of arrays
            elif isinstance(value, dict):
                found.update(_modules(value))
    return found


def haiku_tree(raw: dict, weights: str) -> tuple[dict[str, dict], str]:
    """(parameters and state merged, description) of the network `weights` names."""
    experiment = raw.get("experiment_state")
    if not isinstance(experiment, dict):
        merged = {**_modules(raw.get("params", raw)), **_modules(raw.get("state", {}))}
        return merged, "haiku parameters"
    network = {"ema": "online", "online": "online", "target": "target", "teacher": "target",
               "student": "online"}.get(weights, "online")
    if weights == "ema":
        params = (raw.get("ema_state") or {}).get("online_params")
        if params is None:
            raise UserError("the checkpoint has no ema_state.online_params (the EMA network the official evaluation "
                            "uses); choose --weights online or target")
    else:
        params = experiment.get(f"{network}_params")
        if params is None:
            raise UserError(f"the checkpoint has no experiment_state.{network}_params; choose another --weights")
    state = experiment.get(f"{network}_state") or {}
    return {**_modules(params), **_modules(state)}, f"official JAX checkpoint ({weights}: {network} network state)"


def _array(value: Any, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise UserError(f"haiku entry {name} is a {type(value).__name__}, not an array")
    return value


def _average(tree: dict, module: str, which: str) -> np.ndarray:
    """A BatchNorm statistic: haiku keeps it in the state module <bn>/~/<which>_ema as `average`."""
    state = tree.get(f"{module}/~/{which}_ema")
    if state is None or "average" not in state:
        raise UserError(f"haiku state {module}/~/{which}_ema is missing: the checkpoint holds no BatchNorm statistics "
                        "(the network state); both parameters and state are needed")
    return _array(state["average"], f"{module}/~/{which}_ema").reshape(-1)


def to_torchvision(tree: dict[str, dict]) -> dict[str, Tensor]:
    """The torchvision names and layouts of the ResNet torso in a haiku tree (see the module docstring)."""
    starts = sorted({m.group(1) for name in tree if (m := TORSO_START.match(name))})
    if len(starts) != 1:
        raise UserError(f"expected one ResNet torso (a module path ending in initial_conv) in the haiku tree, found "
                        f"{len(starts)}: {starts[:3]}")
    prefix = starts[0]
    out: dict[str, Tensor] = {}

    def conv(module: str, target: str) -> None:
        weight = _array(tree[module]["w"], module)  # [kh, kw, in, out]
        out[f"{target}.weight"] = torch.from_numpy(np.ascontiguousarray(weight.transpose(3, 2, 0, 1))).float()

    def batchnorm(module: str, target: str) -> None:
        entry = tree[module]
        out[f"{target}.weight"] = torch.from_numpy(_array(entry["scale"], module).reshape(-1).copy()).float()
        out[f"{target}.bias"] = torch.from_numpy(_array(entry["offset"], module).reshape(-1).copy()).float()
        out[f"{target}.running_mean"] = torch.from_numpy(_average(tree, module, "mean").copy()).float()
        out[f"{target}.running_var"] = torch.from_numpy(_average(tree, module, "var").copy()).float()
        out[f"{target}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)

    for name in tree:
        if not name.startswith(prefix) or "_ema" in name:
            continue
        relative = name[len(prefix):]
        if relative == "initial_conv":
            conv(name, "conv1")
        elif relative == "initial_batchnorm":
            batchnorm(name, "bn1")
        elif m := BLOCK.match(relative):
            group, block, kind, index = int(m.group(1)), int(m.group(2)), m.group(3), int(m.group(4))
            target = f"layer{group + 1}.{block}.{'conv' if kind == 'conv' else 'bn'}{index + 1}"
            (conv if kind == "conv" else batchnorm)(name, target)
        elif m := SHORTCUT.match(relative):
            group, block, kind = int(m.group(1)), int(m.group(2)), m.group(3)
            (conv if kind == "conv" else batchnorm)(name, f"layer{group + 1}.{block}.downsample.{0 if kind == 'conv' else 1}")
    return out


# ------------------------------------------------------------------------------------------ padding

def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) along one axis: out = ceil(size / stride), and the total
    max((out - 1) stride + (kernel - 1) dilation + 1 - size, 0) split with the odd one after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d that pads as TensorFlow's SAME (the same parameters, so state dicts are unchanged)."""

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


class MaxPool2dSame(nn.MaxPool2d):
    """Max pooling with TensorFlow's SAME padding (padded values never win: -inf)."""

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = same_padding(x.shape[-1], self.kernel_size, self.stride)
        return F.max_pool2d(F.pad(x, (left, right, top, bottom), value=-math.inf), self.kernel_size, self.stride)


def same_padding_(model: nn.Module) -> nn.Module:
    """Make every convolution and the stem's max pooling of a torchvision ResNet pad as TensorFlow's SAME."""
    for name, child in model.named_children():
        if isinstance(child, nn.Conv2d) and not isinstance(child, Conv2dSame):
            same = Conv2dSame(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                              child.dilation, child.groups, child.bias is not None)
            same.weight = child.weight
            if child.bias is not None:
                same.bias = child.bias
            setattr(model, name, same)
        elif isinstance(child, nn.MaxPool2d) and not isinstance(child, MaxPool2dSame):
            setattr(model, name, MaxPool2dSame(child.kernel_size, child.stride))
        else:
            same_padding_(child)
    return model
