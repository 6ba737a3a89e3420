"""BYOL's asymmetric two-view augmentation (Grill et al. 2020, appendix B) and the evaluation transform.

Both take uint8 image tensors [C, H, W] (or PIL images) and return normalised float32 tensors. The crop and
flip are torchvision's; the photometric part (colour jitter, grayscale, blur, solarize) is the official code's,
from pretrain/batch_augment.py, run here on one image at a time (the per-image path) or there on a whole batch
on the training device (augment.batched).
"""
from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2

from pretrain.batch_augment import BatchPhotometric
from pretrain.schema import AugmentConfig


def byol_crop_transform(config: AugmentConfig, image_size: int) -> v2.Compose:
    """The geometric part alone (crop, flip), as uint8: the rest runs per batch (pretrain/batch_augment.py)."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=tuple(config.crop_scale), ratio=tuple(config.crop_ratio),
                             interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(config.flip_p),
    ])


class OneImagePhotometric:
    """The photometric part of one view on one uint8 image [3, H, W], from torch's global generator (which
    pretrain.data.Augmented seeds per image)."""

    def __init__(self, config: AugmentConfig, image_size: int, view: int):
        self.photometric = BatchPhotometric(config, image_size, view)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.photometric(image.as_subclass(torch.Tensor)[None], None)[0]


def byol_view_transform(config: AugmentConfig, image_size: int, view: int) -> v2.Compose:
    """The transform of view 1 (view=0: blur always, no solarize) or view 2 (view=1: blur 0.1, solarize 0.2)."""
    return v2.Compose([byol_crop_transform(config, image_size), OneImagePhotometric(config, image_size, view)])


class TwoCrops:
    """image -> two independent uint8 crops, for the batched photometric step."""

    def __init__(self, config: AugmentConfig, image_size: int):
        self.crop = byol_crop_transform(config, image_size)

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.crop(image).as_subclass(torch.Tensor), self.crop(image).as_subclass(torch.Tensor)


class TwoViews:
    """image -> (view 1, view 2), each from its own BYOL transform."""

    def __init__(self, config: AugmentConfig, image_size: int):
        self.first = byol_view_transform(config, image_size, 0)
        self.second = byol_view_transform(config, image_size, 1)

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first(image), self.second(image)


def eval_transform(image_size: int, mean, std, resize_ratio: float = 256 / 224) -> v2.Compose:
    """Deterministic: resize the short side to image_size * 256/224 (bicubic), centre-crop image_size."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(round(image_size * resize_ratio), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])
