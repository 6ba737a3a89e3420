"""Check that an exported backbone means the same network in torchvision, detectron2 and mmsegmentation.

The detectron2 .pkl and the mmseg .pth are written to a temporary folder and loaded the way those frameworks
load pretrained weights: detectron2's DetectionCheckpointer (matching heuristics) into its ResNet backbone,
and mmsegmentation's ResNet with init_cfg=Pretrained. Every weight must be used; then one input runs through
all three in eval mode and the feature maps of each stage are compared with torchvision's.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from pretrain.errors import UserError
from transfer.backbone import Backbone

STAGES = ("stem", "res2", "res3", "res4", "res5")
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}


class VerificationFailed(UserError):
    pass


@dataclass
class Report:
    arch: str
    max_abs_diff: dict[str, dict[str, float]] = field(default_factory=dict)  # framework -> stage -> diff
    unused: dict[str, list[str]] = field(default_factory=dict)               # framework -> keys not loaded

    def worst(self) -> float:
        return max(d for stages in self.max_abs_diff.values() for d in stages.values())

    def table(self) -> str:
        lines = [f"{'framework':12s} " + " ".join(f"{s:>10s}" for s in STAGES) + "   unused weights"]
        for name, stages in self.max_abs_diff.items():
            lines.append(f"{name:12s} " + " ".join(f"{stages.get(s, float('nan')):10.2e}" for s in STAGES)
                         + f"   {len(self.unused.get(name, []))}")
        return "\n".join(lines)


def torchvision_stages(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {"stem": x}
    for i, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        x = stage(x)
        out[f"res{i + 2}"] = x
    return out


def detectron2_backbone(arch: str, pkl: Path) -> tuple[nn.Module, list[str]]:
    """detectron2's ResNet (torchvision-style: STRIDE_IN_1X1 False) loaded by DetectionCheckpointer; returns the
    model and the keys it reported as missing or unexpected."""
    from transfer.detectron2_compat import import_detectron2
    import_detectron2()
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = DEPTHS[arch]
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if DEPTHS[arch] < 50 else 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    model = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(pkl)))
    problems = list(incompatible.missing_keys) + list(incompatible.unexpected_keys) + \
        [k for k, *_ in incompatible.incorrect_shapes]
    return model.eval(), problems


def detectron2_stages(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    return {"stem": model.stem(x), **model(x)}


def mmseg_backbone(arch: str, path: Path, canonical: dict[str, Tensor]) -> tuple[nn.Module, list[str]]:
    """mmsegmentation's ResNet (torchvision-style stem) with init_cfg=Pretrained(prefix='backbone.').

    mmengine loads non-strictly and only logs mismatches, so every tensor of the built model is compared
    with the file: a key that is missing, or a value that was not loaded, is reported."""
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    from mmengine.logging import MMLogger
    register_all_modules()
    MMLogger.get_current_instance().setLevel("WARNING")  # it logs a paragraph per loaded tensor
    model = MODELS.build(dict(type="ResNet", depth=DEPTHS[arch], out_indices=(0, 1, 2, 3), style="pytorch",
                              init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="backbone.")))
    model.init_weights()
    state = model.state_dict()
    problems = sorted(set(state) ^ set(canonical))
    problems += [k for k in set(state) & set(canonical) if not torch.equal(state[k].cpu(), canonical[k])]
    model.eval()  # mmseg's ResNet.train() returns None, so no chaining
    return model, problems


def mmseg_stages(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    stem = model.maxpool(model.relu(model.norm1(model.conv1(x))))
    return {"stem": stem, **{f"res{i + 2}": out for i, out in enumerate(model(x))}}


@torch.no_grad()
def verify(backbone: Backbone, image_size: int = 96, tolerance: float = 1e-4, seed: int = 0) -> Report:
    """Compare the three frameworks on one input; raise VerificationFailed past `tolerance` or on unused weights."""
    from transfer import export
    report = Report(backbone.arch)
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    reference = torchvision_stages(backbone.model().eval(), x)
    with tempfile.TemporaryDirectory() as tmp:
        pkl = export.write(backbone, "detectron2", Path(tmp) / "backbone.pkl")
        mm = export.write(backbone, "mmseg", Path(tmp) / "backbone.mmseg.pth")
        d2_model, report.unused["detectron2"] = detectron2_backbone(backbone.arch, pkl)
        mm_model, report.unused["mmseg"] = mmseg_backbone(backbone.arch, mm, backbone.state_dict)
    for name, stages in (("torchvision", reference), ("detectron2", detectron2_stages(d2_model, x)),
                         ("mmseg", mmseg_stages(mm_model, x))):
        report.max_abs_diff[name] = {s: (stages[s] - reference[s]).abs().max().item() for s in STAGES}
    bad_stages = [f"{name} {stage} ({diff:.2e})" for name, stages in report.max_abs_diff.items()
                  for stage, diff in stages.items() if diff > tolerance]
    unused = {name: keys for name, keys in report.unused.items() if keys}
    if bad_stages or unused:
        detail = "; ".join(f"{name}: {len(keys)} weights not loaded ({', '.join(keys[:4])})"
                           for name, keys in unused.items())
        raise VerificationFailed(f"{backbone.source}: the exported backbone differs across frameworks: "
                                 f"{', '.join(bad_stages) or 'all stages within tolerance'}{'; ' + detail if detail else ''}")
    return report
