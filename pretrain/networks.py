"""Networks: torchvision ResNet backbones (architecture unchanged, so every export path applies),
the
projector / predictor MLPs, and the online network that chains them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from common.errors import UserError


@dataclass(frozen=True)
class Architecture:
    """A ResNet as the official (haiku) code and the paper name it: residual block type, blocks per
    stage and width multiplier w. The stem has 64 w channels, stage i (0..3) bottleneck blocks 64 w
    2^i inner and 256 w 2^i output channels (basic blocks: 64 w 2^i both), so the pooled feature has
    2048 w (basic: 512 w) channels. Key names
    are torchvision's whatever the width (conv1, bn1, layerN.M.convK / bnK, downsample.0 / .1)."""

    name: str
    block: str  # "basic" | "bottleneck"
    layers: tuple[int, int, int, int]  # blocks per stage
    # multiplier of every channel count (the paper's 1x, 2x, 4x)
    width: int = 1

    @property
    def depth(self) -> int:
        """The layer count the frameworks spell (18, 50, 200): 2 (basic) or 3 (bottleneck) per
        block, plus 2."""
        return (2 if self.block == "basic" else 3) * sum(self.layers) + 2

    @property
    def stem_channels(self) -> int:
        return 64 * self.width

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Output channels of stages 1..4 (res2..res5)."""
        expansion = 1 if self.block == "basic" else 4
        return tuple(64 * self.width * 2**i * expansion for i in range(4))

    @property
    def feature_width(self) -> int:
        return self.stage_channels[-1]


# The one architecture table: every ResNet this platform builds, imports and exports.
ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("resnet18", "basic", (2, 2, 2, 2)),
        Architecture("resnet34", "basic", (3, 4, 6, 3)),
        Architecture("resnet50", "bottleneck", (3, 4, 6, 3)),
        Architecture("resnet101", "bottleneck", (3, 4, 23, 3)),
        Architecture("resnet152", "bottleneck", (3, 8, 36, 3)),
        Architecture("resnet50x2", "bottleneck", (3, 4, 6, 3), 2),
        Architecture("resnet50x4", "bottleneck", (3, 4, 6, 3), 4),
        Architecture("resnet200", "bottleneck", (3, 24, 36, 3)),
        Architecture("resnet200x2", "bottleneck", (3, 24, 36, 3), 2),
    )
}
# pretraining offers
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet50x2", "resnet50x4", "resnet200x2")


def architecture(arch: str) -> Architecture:
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def resnet_depth(arch: str) -> int:
    """The depth of a ResNet (resnet50x2 -> 50), as detectron2 and mmsegmentation spell it."""
    return architecture(arch).depth


def feature_width(arch: str) -> int:
    """Channels of the last stage (the pooled feature size): 512 w for basic blocks, 2048 w for
    bottlenecks."""
    return architecture(arch).feature_width


def _scaled_resnet(spec: Architecture, zero_init_residual: bool) -> nn.Module:
    """torchvision's ResNet with every channel count multiplied by spec.width (haiku's
    width_multiplier): built by
    torchvision's own constructor and layer factory, with its stem and stage widths scaled."""
    block = BasicBlock if spec.block == "basic" else Bottleneck

    class WideResNet(ResNet):
        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            return super()._make_layer(block, planes * spec.width, blocks, stride, dilate)

    model = WideResNet.__new__(WideResNet)
    nn.Module.__init__(model)
    # torchvision's ResNet.__init__ with a stem of 64 w channels (its inplanes is fixed at 64)
    model._norm_layer, model.inplanes, model.dilation = nn.BatchNorm2d, 64 * spec.width, 1
    model.groups, model.base_width = 1, 64
    model.conv1 = nn.Conv2d(3, model.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(model.inplanes)
    model.relu = nn.ReLU(inplace=True)
    model.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    model.layer1 = model._make_layer(block, 64, spec.layers[0])
    model.layer2 = model._make_layer(block, 128, spec.layers[1], stride=2)
    model.layer3 = model._make_layer(block, 256, spec.layers[2], stride=2)
    model.layer4 = model._make_layer(block, 512, spec.layers[3], stride=2)
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    model.fc = nn.Linear(spec.feature_width, 1000)
    for m in model.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)
    return model


def build_resnet(
    arch: str, state_dict: dict[str, Tensor] | None = None, zero_init_residual: bool = False
) -> nn.Module:
    """A torchvision ResNet of the table without its classifier (fc = Identity), optionally loaded
    strictly.

    `zero_init_residual` starts the scale of the last BatchNorm of every residual block at 0, so
    that each block starts as the identity, as the official (haiku) ResNet does; torchvision's
    default starts it at 1."""
    spec = architecture(arch)
    if spec.width == 1 and hasattr(torchvision.models, arch):
        model = getattr(torchvision.models, arch)(
            weights=None, zero_init_residual=zero_init_residual
        )
    else:
        model = _scaled_resnet(spec, zero_init_residual)
    model.fc = nn.Identity()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def build_backbone(name: str, zero_init_residual: bool = False) -> tuple[nn.Module, int]:
    """A pretraining backbone (fc = Identity) and its feature width."""
    if name not in BACKBONES:
        raise UserError(
            f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)} (model.backbone)"
        )
    return build_resnet(name, zero_init_residual=zero_init_residual), feature_width(name)


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> BatchNorm (momentum 0.1, eps 1e-5) -> ReLU -> Linear without bias, as in BYOL."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim, eps=1e-5, momentum=0.1),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
    )


class Encoder(nn.Module):
    """backbone -> projector: what the target network copies. forward returns (features,
    projection)."""

    def __init__(
        self,
        backbone: str,
        projector_hidden: int,
        embedding_dim: int,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.backbone, width = build_backbone(backbone, zero_init_residual)
        self.projector = mlp(width, projector_hidden, embedding_dim)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(images)
        return features, self.projector(features)


def linear_probe(in_dim: int, num_classes: int, seed: int) -> nn.Linear:
    """The online probe's classifier: weights from a truncated normal with std 1/sqrt(in_dim)
    (haiku's Linear), drawn from their own generator so that adding the probe leaves every other
    random draw of the run as it
    was; bias 0."""
    # nn.Linear's own init would draw from the global generator
    with torch.random.fork_rng(devices=[]):
        probe = nn.Linear(in_dim, num_classes)
    std = in_dim**-0.5
    with torch.no_grad():
        nn.init.trunc_normal_(
            probe.weight,
            std=std,
            a=-2 * std,
            b=2 * std,
            generator=torch.Generator().manual_seed(seed),
        )
        probe.bias.zero_()
    return probe


class OnlineNetwork(nn.Module):
    """The trained network: an Encoder, in the with-target variant a predictor on its projection,
    and optionally an online linear probe (`num_classes` > 0) for the detached backbone features
    (the trainer applies it to view 1 only, behind detach(), so its loss never reaches the backbone:
    the official code's stop_gradient).

    forward returns (backbone features, projection, prediction); without a predictor, prediction = projection.
    """

    def __init__(
        self,
        backbone: str,
        projector_hidden: int,
        embedding_dim: int,
        predictor_hidden: int,
        use_predictor: bool,
        zero_init_residual: bool = False,
        num_classes: int = 0,
        probe_seed: int = 0,
    ):
        super().__init__()
        self.encoder = Encoder(backbone, projector_hidden, embedding_dim, zero_init_residual)
        self.predictor = (
            mlp(embedding_dim, predictor_hidden, embedding_dim) if use_predictor else nn.Identity()
        )
        self.probe = (
            linear_probe(feature_width(backbone), num_classes, probe_seed) if num_classes else None
        )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features, projection = self.encoder(images)
        return features, projection, self.predictor(projection)


@torch.no_grad()
def effective_rank(embeddings: Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., ICML 2023): exp(entropy of the normalised singular values), in [1,
    min(n, d)].

    rank = exp(-sum_k p_k log p_k), p_k = sigma_k / sum_j sigma_j + eps. A label-free signal: collapsed
    representations have a small effective rank.
    """
    singular = torch.linalg.svdvals(embeddings.float())
    p = singular / singular.sum() + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))
