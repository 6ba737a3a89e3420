"""BYOL's asymmetric two-view augmentation (Grill et al. 2020, appendix B) and the evaluation transform.

Both work on uint8 image tensors [C, H, W] (or PIL images) with torchvision.transforms.v2 and return
normalised float32 tensors. The blur kernel scales with the crop: 23 px at 224 px, i.e. about 10%.
"""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from pretrain.schema import AugmentConfig


def blur_kernel_size(image_size: int) -> int:
    """BYOL's 23 px kernel at 224 px, scaled to `image_size`, odd and at least 3."""
    size = max(3, round(image_size * 23 / 224))
    return size if size % 2 else size + 1


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur float images [B, C, H, W] with a per-sample sigma [B] (0 = no blur), reflect padding.

    The kernel g(x) = exp(-x^2 / (2 sigma^2)) / sum_x g, x = -(k-1)/2 .. (k-1)/2, is applied as two 1-D
    depthwise convolutions (rows, then columns) over all B*C channels at once.
    """
    batch, channels, height, width = images.shape
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, device=images.device, dtype=images.dtype)
    safe_sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma)).view(-1, 1)
    kernels = torch.exp(-0.5 * (x / safe_sigma) ** 2)
    kernels = kernels / kernels.sum(1, keepdim=True)
    delta = (x == 0).to(images.dtype).expand_as(kernels)
    kernels = torch.where((sigma > 0).view(-1, 1), kernels, delta).repeat_interleave(channels, 0)
    pad = kernel_size // 2
    out = torch.nn.functional.pad(images.reshape(1, batch * channels, height, width), (pad,) * 4, mode="reflect")
    out = torch.nn.functional.conv2d(out, kernels.view(-1, 1, 1, kernel_size), groups=batch * channels)
    out = torch.nn.functional.conv2d(out, kernels.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return out.view(batch, channels, height, width)


class SeparableGaussianBlur(torch.nn.Module):
    """Gaussian blur with sigma ~ U[sigma_min, sigma_max], as two 1-D convolutions (reflect padding).

    torchvision's GaussianBlur convolves with the full k x k kernel; the separable form gives the same image
    (up to float rounding) with 2k instead of k^2 multiplies per pixel: at k = 23 it was 8x faster here
    (bench/data_pipeline.py). Takes and returns uint8 or float images [..., C, H, W].
    """

    def __init__(self, kernel_size: int, sigma: tuple[float, float]):
        super().__init__()
        self.kernel_size, self.sigma = kernel_size, tuple(sigma)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        images = image.float().reshape(-1, *image.shape[-3:])
        sigma = torch.empty(1).uniform_(*self.sigma).expand(len(images))
        out = gaussian_blur(images, sigma, self.kernel_size)
        out = out.reshape(image.shape)
        if image.dtype == torch.uint8:
            out = out.round_().clamp_(0, 255).to(torch.uint8)
        return tv_tensors.wrap(out, like=image) if isinstance(image, tv_tensors.Image) else out


def byol_crop_transform(config: AugmentConfig, image_size: int) -> v2.Compose:
    """The geometric part alone (crop, flip), as uint8: the rest runs per batch (pretrain/batch_augment.py)."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=tuple(config.crop_scale), ratio=tuple(config.crop_ratio),
                             interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(config.flip_p),
    ])


def byol_view_transform(config: AugmentConfig, image_size: int, view: int) -> v2.Compose:
    """The transform of view 1 (view=0: blur always, no solarize) or view 2 (view=1: blur 0.1, solarize 0.2)."""
    return v2.Compose([
        byol_crop_transform(config, image_size),
        v2.RandomApply([v2.ColorJitter(config.brightness, config.contrast, config.saturation, config.hue)],
                       p=config.jitter_p),  # ColorJitter applies its four parts in a random order
        v2.RandomGrayscale(config.grayscale_p),
        v2.RandomApply([SeparableGaussianBlur(blur_kernel_size(image_size), tuple(config.blur_sigma))],
                       p=config.blur_p[view]),
        v2.RandomSolarize(threshold=128, p=config.solarize_p[view]),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(config.mean), list(config.std)),
    ])


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
