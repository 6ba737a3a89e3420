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


def build_resnet(arch: str, state_dict: dict[str, Tensor] | None = None, zero_init_residual: bool = False
                 ) -> nn.Module:
    """A torchvision ResNet without its classifier (fc = Identity), optionally loaded strictly.

    `zero_init_residual` starts the scale of the last BatchNorm of every residual block at 0, so that each
    block starts as the identity, as the official (haiku) ResNet does; torchvision's default starts it at 1."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHITECTURES)}")
    import torchvision
    model = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    model.fc = nn.Identity()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def build_backbone(name: str, zero_init_residual: bool = False) -> tuple[nn.Module, int]:
    """A pretraining backbone (fc = Identity) and its feature width."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)} (model.backbone)")
    return build_resnet(name, zero_init_residual=zero_init_residual), feature_width(name)


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> BatchNorm (momentum 0.1, eps 1e-5) -> ReLU -> Linear without bias, as in BYOL."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim, eps=1e-5, momentum=0.1),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim, bias=False))


class Encoder(nn.Module):
    """backbone -> projector: what the target network copies. forward returns (features, projection)."""

    def __init__(self, backbone: str, projector_hidden: int, embedding_dim: int, zero_init_residual: bool = False):
        super().__init__()
        self.backbone, width = build_backbone(backbone, zero_init_residual)
        self.projector = mlp(width, projector_hidden, embedding_dim)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(images)
        return features, self.projector(features)


def linear_probe(in_dim: int, num_classes: int, seed: int) -> nn.Linear:
    """The online probe's classifier: weights from a truncated normal with std 1/sqrt(in_dim) (haiku's Linear),
    drawn from their own generator so that adding the probe leaves every other random draw of the run as it
    was; bias 0."""
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init would draw from the global generator
        probe = nn.Linear(in_dim, num_classes)
    std = in_dim ** -0.5
    with torch.no_grad():
        nn.init.trunc_normal_(probe.weight, std=std, a=-2 * std, b=2 * std,
                              generator=torch.Generator().manual_seed(seed))
        probe.bias.zero_()
    return probe


class OnlineNetwork(nn.Module):
    """The trained network: an Encoder, in the with-target variant a predictor on its projection, and optionally
    an online linear probe (`num_classes` > 0) for the detached backbone features (the trainer applies it to
    view 1 only, behind detach(), so its loss never reaches the backbone: the official code's stop_gradient).

    forward returns (backbone features, projection, prediction); without a predictor, prediction = projection.
    """

    def __init__(self, backbone: str, projector_hidden: int, embedding_dim: int, predictor_hidden: int,
                 use_predictor: bool, zero_init_residual: bool = False, num_classes: int = 0, probe_seed: int = 0):
        super().__init__()
        self.encoder = Encoder(backbone, projector_hidden, embedding_dim, zero_init_residual)
        self.predictor = mlp(embedding_dim, predictor_hidden, embedding_dim) if use_predictor else nn.Identity()
        self.probe = linear_probe(feature_width(backbone), num_classes, probe_seed) if num_classes else None

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
