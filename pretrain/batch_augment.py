"""BYOL's photometric augmentations as the official code computes them (byol/utils/augmentations.py,
which follows TensorFlow's image ops), on a whole batch at once, on the batch's device; the
per-image pipeline (pretrain/augment.py) runs the same code on a batch of one.

Each image draws its own parameters, and the colour jitter's four operations run in an order drawn
per image; after each, x is clipped to [0, 1]. On x in [0, 1], per image:

    brightness:  x -> x + delta,                       delta ~ U[-b, b]          (an added shift)
    contrast:    x_c -> f (x_c - mean(x_c)) + mean(x_c), f ~ U[1 - c, 1 + c]       (each channel's own mean)
    saturation:  hsv(x) -> (h, clip(f s, 0, 1), v),     f ~ U[1 - s, 1 + s]
    hue:         hsv(x) -> ((h + delta) mod 1, s, v),   delta ~ U[-h, h]
    grayscale:   x -> 0.2989 r + 0.587 g + 0.114 b on all three channels
    blur:        separable Gaussian, sigma ~ U[sigma_min, sigma_max], kernel 23 px at 224 px, reflect padding
    solarize:    x -> x if x < 0.5 else 1 - x

The jitter is applied with probability jitter_p, grayscale with grayscale_p (independently), blur
and solarize with their view's probabilities. A batch's draws can be those of a larger global batch,
sliced (`offset`, `total`): then an image's views depend on its place in the global batch only, not
on how many processes share it."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.schema import AugmentConfig

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as the official code and torchvision
SOLARIZE_THRESHOLD = 0.5


def blur_kernel_size(image_size: int) -> int:
    """BYOL's 23 px kernel at 224 px, scaled to `image_size`, odd and at least 3."""
    size = max(3, round(image_size * 23 / 224))
    return size if size % 2 else size + 1


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur float images [B, C, H, W] with a per-sample sigma [B] (0 = no blur), reflect padding.

    The kernel g(x) = exp(-x^2 / (2 sigma^2)) / sum_x g, x = -(k-1)/2 .. (k-1)/2, is applied as two 1-D
    depthwise convolutions (rows, then columns) over all B*C channels at once: 2k instead of k^2
    multiplies per pixel."""
    batch, channels, height, width = images.shape
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, device=images.device, dtype=images.dtype)
    safe_sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma)).view(-1, 1)
    kernels = torch.exp(-0.5 * (x / safe_sigma) ** 2)
    kernels = kernels / kernels.sum(1, keepdim=True)
    delta = (x == 0).to(images.dtype).expand_as(kernels)
    kernels = torch.where((sigma > 0).view(-1, 1), kernels, delta).repeat_interleave(channels, 0)
    pad = kernel_size // 2
    out = torch.nn.functional.pad(
        images.reshape(1, batch * channels, height, width), (pad,) * 4, mode="reflect"
    )
    out = torch.nn.functional.conv2d(
        out, kernels.view(-1, 1, 1, kernel_size), groups=batch * channels
    )
    out = torch.nn.functional.conv2d(
        out, kernels.view(-1, 1, kernel_size, 1), groups=batch * channels
    )
    return out.view(batch, channels, height, width)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W]."""
    r, g, b = images.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _per_sample(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def adjust_brightness(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (images + _per_sample(delta)).clamp_(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = images.mean(dim=(2, 3), keepdim=True)
    return (_per_sample(factor) * (images - mean) + mean).clamp_(0, 1)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = rgb_to_hsv(images).unbind(1)
    saturation = (saturation * factor.view(-1, 1, 1)).clamp(0, 1)
    return hsv_to_rgb(torch.stack((hue, saturation, value), 1)).clamp_(0, 1)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> (h, s, v), h in [0, 1)."""
    r, g, b = images.unbind(1)
    value = images.amax(1)
    chroma = value - images.amin(1)
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    saturation = torch.where(
        value > 0,
        chroma / torch.where(value > 0, value, torch.ones_like(value)),
        torch.zeros_like(value),
    )
    hue = torch.where(
        value == r,
        (g - b) / safe_chroma,
        torch.where(value == g, 2 + (b - r) / safe_chroma, 4 + (r - g) / safe_chroma),
    )
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue)).remainder(1.0)
    return torch.stack((hue, saturation, value), 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_hsv: c = v s, and each channel n in (5, 3, 1) is v - c clamp(min(k, 4 - k),
    0, 1)
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
    flip = (images >= SOLARIZE_THRESHOLD) & apply.view(-1, 1, 1, 1)
    return torch.where(flip, 1 - images, images)


JITTER = (
    ("brightness", adjust_brightness, 0.0),
    ("contrast", adjust_contrast, 1.0),
    # (name, op, identity), in slot order
    ("saturation", adjust_saturation, 1.0),
    ("hue", adjust_hue, 0.0),
)


def colour_jitter(images: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
    """The four jitter operations on float images [B, 3, H, W] in [0, 1], each image in its own
    order.

    `draws` holds each operation's per-image parameter (identity where an image skips it) and
    "order" [B, 4], a permutation of the slots per image, on the CPU. At position j every operation
    runs on the images whose j-th slot it is (and whose parameter is not the identity): as much work
    as one pass of the four over the batch."""
    order = draws["order"]
    x = images
    for position in range(4):
        for slot, (name, adjust, identity) in enumerate(JITTER):
            chosen = torch.nonzero(
                (order[:, position] == slot) & (draws[name] != identity)
            ).squeeze(1)
            # e.g. the HSV round trip, the costliest op, is skipped when no image needs it
            if len(chosen) == 0:
                continue
            rows = chosen.to(x.device, non_blocking=True)
            parameter = draws[name][chosen].to(x.device, non_blocking=True)
            x = x.index_copy(0, rows, adjust(x.index_select(0, rows), parameter))
    return x


class BatchPhotometric(nn.Module):
    """One view's colour jitter, grayscale, blur, solarize and normalisation: uint8 [B, 3, H, W] ->
    float.

    `view` 0 or 1 picks the blur and solarize probabilities of BYOL's view 1 or view 2. Random draws
    come from `generator` (CPU; None: torch's global generator), so a run's views are a function of
    its seed and step."""

    def __init__(self, config: AugmentConfig, image_size: int, view: int):
        super().__init__()
        self.config, self.view = config, view
        self.kernel_size = blur_kernel_size(image_size)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    def draw(self, batch: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """The per-image parameters, identity where a step is skipped, and each image's jitter
        order."""
        c = self.config

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.rand(batch, generator=generator) * (high - low) + low

        def coin(p: float) -> torch.Tensor:
            return torch.rand(batch, generator=generator) < p

        jitter = coin(c.jitter_p)
        return {
            "brightness": torch.where(jitter, uniform(-c.brightness, c.brightness), 0.0),
            "contrast": torch.where(jitter, uniform(1 - c.contrast, 1 + c.contrast), 1.0),
            "saturation": torch.where(jitter, uniform(1 - c.saturation, 1 + c.saturation), 1.0),
            "hue": torch.where(jitter, uniform(-c.hue, c.hue), 0.0),
            # a uniform permutation per image
            "order": torch.rand(batch, 4, generator=generator).argsort(1),
            "grayscale": coin(c.grayscale_p),
            "sigma": torch.where(coin(c.blur_p[self.view]), uniform(*c.blur_sigma), 0.0),
            "solarize": coin(c.solarize_p[self.view]),
        }

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None,
        offset: int = 0,
        total: int | None = None,
    ) -> torch.Tensor:
        """Augment `images`, the rows offset .. offset + B - 1 of a batch of `total` (default: B)
        whose
        parameters are drawn together."""
        draws = self.draw(total or len(images), generator)
        draws = {k: v[offset : offset + len(images)] for k, v in draws.items()}
        x = colour_jitter(images.float().div_(255), draws)
        device = {
            k: draws[k].to(images.device, non_blocking=True)
            for k in ("grayscale", "sigma", "solarize")
        }
        x = torch.where(device["grayscale"].view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        x = gaussian_blur(x, device["sigma"], self.kernel_size)
        x = solarize(x, device["solarize"])
        return (x - self.mean) / self.std
