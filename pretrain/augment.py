"""BYOL's asymmetric two-view augmentation (Grill et al. 2020, appendix B) and the evaluation
transform.

Both take uint8 image tensors [C, H, W] (or PIL images) and return normalised float32 tensors. The
crop is the official code's sampler (InceptionCrop below, not torchvision's RandomResizedCrop), the
flip torchvision's; the photometric part (colour jitter, grayscale, blur, solarize) is the official
code's, from pretrain/batch_augment.py, run here on one image at a time (the per-image path) or
there on a whole batch on the training device (augment.batched)."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from pretrain.batch_augment import BatchPhotometric
from pretrain.schema import AugmentConfig


def official_crop_box(
    height: int,
    width: int,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """The random crop box (top, left, h, w) of the official code, on an image of height x width.

    Source: BYOL's `_decode_and_random_crop`, deepmind-research byol/utils/dataset.py:206-233
    (commit d8df415, unchanged since 2e866f1, 2021-04-28), which SSL-HSIC's official code
    (google-deepmind/ssl_hsic, requirements.txt:13) imports for pretraining
    (PreprocessMode.PRETRAIN) and for the linear evaluation's training split (LINEAR_TRAIN). It does
    NOT call tf.image.sample_distorted_bounding_box: it makes exactly one draw, never retries, and
    has no centre-crop fallback (the centre crop, `_decode_and_center_crop`, is for evaluation
    only). In order:

    1. target_area = U[scale[0], scale[1]) * H * W                                     (dataset.py:209-210)
    2. aspect = exp(U[log ratio[0], log ratio[1]))                                     (dataset.py:212-214)
    3. w = round(sqrt(target_area * aspect)), h = round(sqrt(target_area / aspect)),
       rounding half to even like tf.round                                             (dataset.py:216-217)
    4. w = min(w, W), h = min(h, H), each clipped on its own, so a crop that overflows one side becomes a full-width
       (or full-height) strip and its area and aspect change                           (dataset.py:219-220)
    5. left = uniform integer in [0, W - w], top = uniform integer in [0, H - h]       (dataset.py:222-229)

    The official code draws area, aspect, left, top in that order; so does this, from `generator`
    (torch's global generator when None, which the datasets seed per image), in float32 as TF does.
    One guard the official code lacks: w and h are at least 1 (its round() can give 0 on images of a
    few pixels, where TF would fail). Versus torchvision's RandomResizedCrop (10 redraws of any box
    that does not fit, then a centre crop), this keeps the clipped boxes: on 4:3 images the mean
    area fraction is 0.52 (torchvision 0.43) and P(area > 0.5) 0.54 (0.39)."""
    area = torch.tensor(float(height * width), dtype=torch.float32)
    target_area = (
        torch.empty((), dtype=torch.float32).uniform_(scale[0], scale[1], generator=generator)
        * area
    )
    log_ratio = torch.log(torch.tensor([ratio[0], ratio[1]], dtype=torch.float32))
    aspect = torch.exp(
        torch.empty((), dtype=torch.float32).uniform_(
            float(log_ratio[0]), float(log_ratio[1]), generator=generator
        )
    )
    w = int(torch.round(torch.sqrt(target_area * aspect)))
    h = int(torch.round(torch.sqrt(target_area / aspect)))
    w, h = max(1, min(w, width)), max(1, min(h, height))
    left = int(torch.randint(0, width - w + 1, (), generator=generator))
    top = int(torch.randint(0, height - h + 1, (), generator=generator))
    return top, left, h, w


class InceptionCrop(v2.RandomResizedCrop):
    """torchvision's RandomResizedCrop with the official code's box (official_crop_box: one draw,
    each side clipped to the image, uniform placement, no retries or centre-crop fallback), resized
    to `size` (bicubic, antialiased, by default). The box comes from torch's global generator; the
    resize and the input types (uint8 tensors, PIL images, tv_tensors) are torchvision's. The
    official code resizes bicubic without antialiasing
    (byol/utils/dataset.py:201, tf.image.resize); this keeps the project's antialias=True unless
    told otherwise."""

    def __init__(
        self,
        size,
        scale=(0.08, 1.0),
        ratio=(3 / 4, 4 / 3),
        interpolation=InterpolationMode.BICUBIC,
        antialias: bool = True,
    ):
        super().__init__(
            size,
            scale=tuple(scale),
            ratio=tuple(ratio),
            interpolation=interpolation,
            antialias=antialias,
        )

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        top, left, h, w = official_crop_box(height, width, self.scale, self.ratio)
        return dict(top=top, left=left, height=h, width=w)


def byol_crop_transform(config: AugmentConfig, image_size: int) -> v2.Compose:
    """The geometric part alone (crop, flip), as uint8: the rest runs per batch
    (pretrain/batch_augment.py)."""
    return v2.Compose(
        [
            v2.ToImage(),
            InceptionCrop(image_size, scale=config.crop_scale, ratio=config.crop_ratio),
            v2.RandomHorizontalFlip(config.flip_p),
        ]
    )


class OneImagePhotometric:
    """The photometric part of one view on one uint8 image [3, H, W], from torch's global generator
    (which
    pretrain.data.Augmented seeds per image)."""

    def __init__(self, config: AugmentConfig, image_size: int, view: int):
        self.photometric = BatchPhotometric(config, image_size, view)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.photometric(image.as_subclass(torch.Tensor)[None], None)[0]


def byol_view_transform(config: AugmentConfig, image_size: int, view: int) -> v2.Compose:
    """The transform of view 1 (view=0: blur always, no solarize) or view 2 (view=1: blur 0.1,
    solarize 0.2)."""
    return v2.Compose(
        [byol_crop_transform(config, image_size), OneImagePhotometric(config, image_size, view)]
    )


class TwoCrops:
    """image -> two independent uint8 crops, for the batched photometric step."""

    def __init__(self, config: AugmentConfig, image_size: int):
        self.crop = byol_crop_transform(config, image_size)

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.crop(image).as_subclass(torch.Tensor), self.crop(image).as_subclass(
            torch.Tensor
        )


class TwoViews:
    """image -> (view 1, view 2), each from its own BYOL transform."""

    def __init__(self, config: AugmentConfig, image_size: int):
        self.first = byol_view_transform(config, image_size, 0)
        self.second = byol_view_transform(config, image_size, 1)

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first(image), self.second(image)


def eval_transform(image_size: int, mean, std, resize_ratio: float = 256 / 224) -> v2.Compose:
    """Deterministic: resize the short side to image_size * 256/224 (bicubic), centre-crop
    image_size."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(
                round(image_size * resize_ratio),
                interpolation=InterpolationMode.BICUBIC,
                antialias=True,
            ),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
