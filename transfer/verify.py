"""Check that an exported backbone means the same network in torchvision, detectron2 and
mmsegmentation.

The detectron2 .pkl and the mmseg .pth are written to a temporary folder and loaded the way those
frameworks load pretrained weights (transfer.detectron2_glue, transfer.mmseg_glue): detectron2's
DetectionCheckpointer (matching heuristics) into its ResNet backbone, and mmsegmentation's ResNet
with init_cfg=Pretrained. Every weight must be used; then one input runs through all three in eval
mode and the feature maps of each stage are compared with torchvision's."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from common.errors import UserError
from transfer import export
from transfer.backbone import Backbone

STAGES = ("stem", "res2", "res3", "res4", "res5")


class VerificationFailed(UserError):
    pass


@dataclass
class Report:
    arch: str
    # framework -> stage -> diff
    max_abs_diff: dict[str, dict[str, float]] = field(default_factory=dict)
    # framework -> keys not loaded
    unused: dict[str, list[str]] = field(default_factory=dict)

    def worst(self) -> float:
        return max(d for stages in self.max_abs_diff.values() for d in stages.values())

    def table(self) -> str:
        lines = [
            f"{'framework':12s} " + " ".join(f"{s:>10s}" for s in STAGES) + "   unused weights"
        ]
        for name, stages in self.max_abs_diff.items():
            lines.append(
                f"{name:12s} "
                + " ".join(f"{stages.get(s, float('nan')):10.2e}" for s in STAGES)
                + f"   {len(self.unused.get(name, []))}"
            )
        return "\n".join(lines)


def torchvision_stages(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {"stem": x}
    for i, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        x = stage(x)
        out[f"res{i + 2}"] = x
    return out


@torch.no_grad()
def verify(
    backbone: Backbone, image_size: int = 96, tolerance: float = 1e-4, seed: int = 0
) -> Report:
    """Compare the three frameworks on one input; raise VerificationFailed past `tolerance` or on
    unused weights."""
    from transfer import detectron2_glue, mmseg_glue

    report = Report(backbone.arch)
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    reference = torchvision_stages(backbone.model().eval(), x)
    with tempfile.TemporaryDirectory() as tmp:
        pkl = export.write(backbone, "detectron2", Path(tmp) / "backbone.pkl")
        mm = export.write(backbone, "mmseg", Path(tmp) / "backbone.mmseg.pth")
        d2_model, report.unused["detectron2"] = detectron2_glue.pretrained_resnet(
            backbone.arch, pkl
        )
        mm_model, report.unused["mmseg"] = mmseg_glue.pretrained_resnet(
            backbone.arch, mm, backbone.state_dict
        )
    for name, stages in (
        ("torchvision", reference),
        ("detectron2", detectron2_glue.resnet_stages(d2_model, x)),
        ("mmseg", mmseg_glue.resnet_stages(mm_model, x)),
    ):
        report.max_abs_diff[name] = {
            s: (stages[s] - reference[s]).abs().max().item() for s in STAGES
        }
    bad_stages = [
        f"{name} {stage} ({diff:.2e})"
        for name, stages in report.max_abs_diff.items()
        for stage, diff in stages.items()
        if diff > tolerance
    ]
    unused = {name: keys for name, keys in report.unused.items() if keys}
    if bad_stages or unused:
        detail = "; ".join(
            f"{name}: {len(keys)} weights not loaded ({', '.join(keys[:4])})"
            for name, keys in unused.items()
        )
        raise VerificationFailed(
            f"{backbone.source}: the exported backbone differs across frameworks: "
            f"{', '.join(bad_stages) or 'all stages within tolerance'}{'; ' + detail if detail else ''}"
        )
    return report
