"""BYOL's photometric augmentations applied to a whole batch at once, on the batch's device.

The per-image pipeline (pretrain/augment.py) spends most of its time in colour jitter (hue) and blur, one
small image at a time. Here the data workers only decode, crop and flip (uint8, `image_size`), and the
colour jitter, grayscale, blur, solarize and normalisation run as a few batched tensor ops: on the GPU
during training, or on the CPU's compute threads where the per-image overhead is gone.

Each sample draws its own factors, as torchvision's ColorJitter does, with these formulas on x in [0, 1]:

    brightness b:  x -> clamp(b x)
    contrast c:    x -> clamp(c x + (1 - c) mean(gray(x)))        (mean over the image)
    saturation s:  x -> clamp(s x + (1 - s) gray(x))
    hue h:         x -> hsv^-1(hsv(x) + (h, 0, 0) mod 1)
    gray(x) = 0.2989 r + 0.587 g + 0.114 b
    blur sigma:    separable Gaussian, kernel k = blur_kernel_size(image_size), reflect padding
    solarize:      x -> 1 - x where x >= 128/255

The four jitter operations run in one random order per batch (torchvision draws one per image). A sample
that skips the jitter gets the identity factors (1, 1, 1, 0); one that skips the blur gets a delta kernel.
"""
from __future__ import annotations

import torch
from torch import nn

from pretrain.augment import blur_kernel_size, gaussian_blur
from pretrain.schema import AugmentConfig

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W]."""
    r, g, b = images.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _per_sample(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * _per_sample(factor)).clamp_(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    factor = _per_sample(factor)
    return (factor * images + (1 - factor) * mean).clamp_(0, 1)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = _per_sample(factor)
    return (factor * images + (1 - factor) * grayscale(images)).clamp_(0, 1)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> (h, s, v), h in [0, 1)."""
    r, g, b = images.unbind(1)
    value = images.amax(1)
    chroma = value - images.amin(1)
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)),
                             torch.zeros_like(value))
    hue = torch.where(value == r, (g - b) / safe_chroma,
                      torch.where(value == g, 2 + (b - r) / safe_chroma, 4 + (r - g) / safe_chroma))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue)).remainder(1.0)
    return torch.stack((hue, saturation, value), 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_hsv: c = v s, and each channel n in (5, 3, 1) is v - c clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6 h) mod 6."""
    hue, saturation, value = hsv.unbind(1)
    chroma = value * saturation
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6 * hue).remainder(6.0)
        channels.append(value - chroma * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(channels, 1)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(images)
    hue = (hsv[:, 0] + shift.view(-1, 1, 1)).remainder(1.0)
    return hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), 1)).clamp_(0, 1)


def solarize(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    flip = (images >= 128 / 255) & apply.view(-1, 1, 1, 1)
    return torch.where(flip, 1 - images, images)


class BatchPhotometric(nn.Module):
    """One view's colour jitter, grayscale, blur, solarize and normalisation: uint8 [B, 3, H, W] -> float.

    `view` 0 or 1 picks the blur and solarize probabilities of BYOL's view 1 or view 2. Random draws come
    from `generator` (CPU), so a run's views are a function of its seed and step.
    """

    def __init__(self, config: AugmentConfig, image_size: int, view: int):
        super().__init__()
        self.config, self.view = config, view
        self.kernel_size = blur_kernel_size(image_size)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    def draw(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The per-sample factors, identity where a step is skipped, and the jitter order."""
        c = self.config

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.rand(batch, generator=generator) * (high - low) + low

        def coin(p: float) -> torch.Tensor:
            return torch.rand(batch, generator=generator) < p

        jitter = coin(c.jitter_p)
        draws = {
            "brightness": torch.where(jitter, uniform(max(0.0, 1 - c.brightness), 1 + c.brightness), 1.0),
            "contrast": torch.where(jitter, uniform(max(0.0, 1 - c.contrast), 1 + c.contrast), 1.0),
            "saturation": torch.where(jitter, uniform(max(0.0, 1 - c.saturation), 1 + c.saturation), 1.0),
            "hue": torch.where(jitter, uniform(-c.hue, c.hue), 0.0),
            "order": torch.randperm(4, generator=generator),
            "grayscale": coin(c.grayscale_p),
            "sigma": torch.where(coin(c.blur_p[self.view]), uniform(*c.blur_sigma), 0.0),
            "solarize": coin(c.solarize_p[self.view]),
        }
        return draws

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        draws = self.draw(len(images), generator)
        order = draws.pop("order").tolist()
        identity = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
        active = {name: bool((draws[name] != value).any()) for name, value in identity.items()}  # on the CPU
        draws = {k: v.to(images.device, non_blocking=True) for k, v in draws.items()}
        x = images.float().div_(255)
        jitter = (("brightness", adjust_brightness), ("contrast", adjust_contrast),
                  ("saturation", adjust_saturation), ("hue", adjust_hue))
        for slot in order:
            name, adjust = jitter[slot]
            if active[name]:  # e.g. the HSV round trip, the costliest op, is skipped when no hue shift is drawn
                x = adjust(x, draws[name])
        x = torch.where(draws["grayscale"].view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        x = gaussian_blur(x, draws["sigma"], self.kernel_size)
        x = solarize(x, draws["solarize"])
        return (x - self.mean) / self.std
