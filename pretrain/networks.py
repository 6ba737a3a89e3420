"""Networks: torchvision ResNet backbones (architecture unchanged, so every export path applies), the
projector / predictor MLPs, and the online network that chains them."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.errors import UserError

# The one architecture table: torchvision's ResNets, (block type, blocks per stage, feature width).
ARCHITECTURES = {
    "resnet18": ("basic", (2, 2, 2, 2), 512), "resnet34": ("basic", (3, 4, 6, 3), 512),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 2048), "resnet101": ("bottleneck", (3, 4, 23, 3), 2048),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 2048),
}
BACKBONES = ("resnet18", "resnet34", "resnet50")   # what the pretraining configs offer


def resnet_depth(arch: str) -> int:
    """The depth of a ResNet name ('resnet50' -> 50), as detectron2 and mmsegmentation spell it."""
    return int(arch[len("resnet"):])


def feature_width(arch: str) -> int:
    """Channels of the last stage (the pooled feature size): 512 for basic blocks, 2048 for bottlenecks."""
    return ARCHITECTURES[arch][2]


def build_resnet(arch: str, state_dict: dict[str, Tensor] | None = None) -> nn.Module:
    """A torchvision ResNet without its classifier (fc = Identity), optionally loaded strictly."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHITECTURES)}")
    import torchvision
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Identity()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """A pretraining backbone (fc = Identity) and its feature width."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)} (model.backbone)")
    return build_resnet(name), feature_width(name)


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> BatchNorm (momentum 0.1, eps 1e-5) -> ReLU -> Linear without bias, as in BYOL."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim, eps=1e-5, momentum=0.1),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim, bias=False))


class Encoder(nn.Module):
    """backbone -> projector: what the target network copies. forward returns (features, projection)."""

    def __init__(self, backbone: str, projector_hidden: int, embedding_dim: int):
        super().__init__()
        self.backbone, width = build_backbone(backbone)
        self.projector = mlp(width, projector_hidden, embedding_dim)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(images)
        return features, self.projector(features)


class OnlineNetwork(nn.Module):
    """The trained network: an Encoder and, in the with-target variant, a predictor on its projection.

    forward returns (backbone features, projection, prediction); without a predictor, prediction = projection.
    """

    def __init__(self, backbone: str, projector_hidden: int, embedding_dim: int, predictor_hidden: int,
                 use_predictor: bool):
        super().__init__()
        self.encoder = Encoder(backbone, projector_hidden, embedding_dim)
        self.predictor = mlp(embedding_dim, predictor_hidden, embedding_dim) if use_predictor else nn.Identity()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features, projection = self.encoder(images)
        return features, projection, self.predictor(projection)


@torch.no_grad()
def effective_rank(embeddings: Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., ICML 2023): exp(entropy of the normalised singular values), in [1, min(n, d)].

    rank = exp(-sum_k p_k log p_k), p_k = sigma_k / sum_j sigma_j + eps. A label-free signal: collapsed
    representations have a small effective rank.
    """
    singular = torch.linalg.svdvals(embeddings.float())
    p = singular / singular.sum() + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))
