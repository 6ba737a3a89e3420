"""The photometric augmentation (pretrain/batch_augment.py) against an independent NumPy
implementation of the official code's TensorFlow-style formulas, and against torchvision where the
two agree (hue, blur, solarize,
grayscale)."""

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from pretrain import batch_augment as B
from pretrain.augment import OneImagePhotometric
from pretrain.schema import AugmentConfig


@pytest.fixture
def images():
    return torch.rand(6, 3, 16, 20, generator=torch.Generator().manual_seed(0))


def test_hue_matches_torchvision_and_zero_shift_is_identity(images):
    shifts = torch.tensor([-0.5, -0.1, -0.03, 0.0, 0.05, 0.1])
    expected = torch.stack([F.adjust_hue(image, float(h)) for image, h in zip(images, shifts)])
    torch.testing.assert_close(B.adjust_hue(images, shifts), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(B.adjust_hue(images, torch.zeros(6)), images, atol=1e-5, rtol=0)


def test_blur_matches_torchvision_and_sigma_zero_is_identity(images):
    sigmas = torch.tensor([0.0, 0.1, 0.5, 1.0, 1.5, 2.0])
    expected = torch.stack(
        [
            F.gaussian_blur(image, [5, 5], [float(s)] * 2) if s > 0 else image
            for image, s in zip(images, sigmas)
        ]
    )
    torch.testing.assert_close(B.gaussian_blur(images, sigmas, 5), expected, atol=1e-6, rtol=0)


def test_solarize_and_grayscale_match_torchvision(images):
    as_uint8 = (images * 255).round().to(torch.uint8)
    expected = torch.stack([F.solarize(image, 128) for image in as_uint8]).float() / 255
    apply = torch.tensor([True, True, False, True, False, True])
    expected = torch.where(apply.view(-1, 1, 1, 1), expected, as_uint8.float() / 255)
    torch.testing.assert_close(
        B.solarize(as_uint8.float() / 255, apply), expected, atol=1e-7, rtol=0
    )
    torch.testing.assert_close(B.grayscale(images), F.rgb_to_grayscale(images), atol=1e-6, rtol=0)


def test_with_every_step_off_it_only_normalises():
    config = AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0))
    crops = torch.randint(
        0, 256, (5, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    out = B.BatchPhotometric(config, 12, 0)(crops, torch.Generator().manual_seed(0))
    expected = F.normalize(crops.float() / 255, list(config.mean), list(config.std))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("view, blur, solarize", [(0, 1.0, 0.0), (1, 0.1, 0.2)])
def test_draws_follow_the_configured_probabilities_and_ranges(view, blur, solarize):
    """Each rate is a binomial proportion over n = 20,000 samples: within 5 standard errors."""
    config, n = AugmentConfig(), 20_000
    draws = B.BatchPhotometric(config, 32, view).draw(n, torch.Generator().manual_seed(view))
    jittered = draws["contrast"] != 1.0
    for rate, p in [
        (jittered.float().mean(), config.jitter_p),
        (draws["grayscale"].float().mean(), config.grayscale_p),
        ((draws["sigma"] > 0).float().mean(), blur),
        (draws["solarize"].float().mean(), solarize),
    ]:
        assert abs(rate.item() - p) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-12
    assert (
        draws["brightness"][jittered].min() >= -0.4 and draws["brightness"][jittered].max() <= 0.4
    )
    assert (draws["brightness"][~jittered] == 0).all()
    assert draws["hue"].abs().max() <= config.hue and (draws["hue"][~jittered] == 0).all()
    sigma = draws["sigma"][draws["sigma"] > 0]
    if len(sigma):
        assert sigma.min() >= config.blur_sigma[0] and sigma.max() <= config.blur_sigma[1]
    orders = draws["order"]
    # a permutation per image
    assert orders.shape == (n, 4) and (orders.sort(1).values == torch.arange(4)).all()
    counts = torch.unique(orders, dim=0, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > n / 24 * 0.8  # all 24 orders, about equally often


def test_the_same_generator_state_gives_the_same_views():
    crops = torch.randint(
        0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    augment = B.BatchPhotometric(AugmentConfig(), 16, 0)
    first = augment(crops, torch.Generator().manual_seed(5))
    assert torch.equal(first, augment(crops, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, augment(crops, torch.Generator().manual_seed(6)))


# ------------------------------------------------------ the official (TensorFlow) formulas, in
# NumPy, per image


def tf_rgb_to_hsv(rgb: np.ndarray):
    """TensorFlow's rgb_to_hsv (as the official code ports it) on [H, W, 3]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(-1)
    spread = value - rgb.min(-1)
    saturation = np.where(value > 0, spread / np.where(value > 0, value, 1), 0)
    norm = np.where(spread != 0, 1 / (6 * np.where(spread != 0, spread, 1)), 1e9)
    hue = np.where(
        r == value,
        norm * (g - b),
        np.where(g == value, norm * (b - r) + 2 / 6, norm * (r - g) + 4 / 6),
    )
    hue = hue * (spread > 0)
    return hue + (hue < 0), saturation, value


def tf_hsv_to_rgb(hue, saturation, value) -> np.ndarray:
    c = saturation * value
    m = value - c
    dh = (hue % 1) * 6
    x = c * (1 - np.abs(dh % 2 - 1))
    sector = np.floor(dh)

    def channel(full, partial):
        return np.where(np.isin(sector, full), c, np.where(np.isin(sector, partial), x, 0)) + m

    return np.stack([channel((0, 5), (1, 4)), channel((1, 2), (0, 3)), channel((3, 4), (2, 5))], -1)


def tf_jitter_op(slot: int, image: np.ndarray, parameter: float) -> np.ndarray:
    if slot == 0:
        out = image + parameter
    elif slot == 1:
        mean = image.mean(axis=(0, 1), keepdims=True)
        out = parameter * (image - mean) + mean
    elif slot == 2:
        h, s, v = tf_rgb_to_hsv(image)
        out = tf_hsv_to_rgb(h, np.clip(s * parameter, 0, 1), v)
    else:
        h, s, v = tf_rgb_to_hsv(image)
        out = tf_hsv_to_rgb((h + parameter) % 1, s, v)
    return np.clip(out, 0, 1)


def tf_view(image: np.ndarray, draws: dict, i: int, config) -> np.ndarray:
    """One image [H, W, 3] in [0, 1] through jitter (in its order), grayscale, solarize and
    normalisation."""
    x = image
    names = ("brightness", "contrast", "saturation", "hue")
    for slot in draws["order"][i].tolist():
        x = tf_jitter_op(slot, x, float(draws[names[slot]][i]))
    if draws["grayscale"][i]:
        x = np.repeat(
            np.tensordot(x, np.array([0.2989, 0.5870, 0.1140]), axes=(-1, -1))[..., None], 3, -1
        )
    if draws["solarize"][i]:
        x = np.where(x < 0.5, x, 1 - x)
    return (x - np.array(config.mean)) / np.array(config.std)


STRONG = AugmentConfig(
    jitter_p=0.9,
    brightness=0.4,
    contrast=0.6,
    saturation=0.8,
    hue=0.3,
    grayscale_p=0.3,
    blur_p=(0.0, 0.0),
    solarize_p=(0.5, 0.5),
)


def test_each_jitter_op_equals_the_tensorflow_formula(images):
    parameters = {
        0: [-0.4, -0.1, 0.0, 0.05, 0.2, 0.4],
        1: [0.4, 0.6, 0.9, 1.0, 1.2, 1.6],
        2: [0.0, 0.2, 0.9, 1.0, 1.3, 1.8],
        3: [-0.3, -0.1, -0.03, 0.0, 0.05, 0.3],
    }
    ops = (B.adjust_brightness, B.adjust_contrast, B.adjust_saturation, B.adjust_hue)
    for slot, values in parameters.items():
        ours = ops[slot](images.clone(), torch.tensor(values)).permute(0, 2, 3, 1).double().numpy()
        for i, value in enumerate(values):
            expected = tf_jitter_op(slot, images[i].permute(1, 2, 0).double().numpy(), value)
            np.testing.assert_allclose(
                ours[i], expected, atol=2e-5, err_msg=f"op {slot}, parameter {value}"
            )


def test_batched_views_follow_the_tensorflow_formulas_in_each_images_order():
    crops = torch.randint(
        0, 256, (12, 3, 10, 14), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    augment = B.BatchPhotometric(STRONG, 10, 1)
    draws = augment.draw(12, torch.Generator().manual_seed(9))
    # the orders differ between images
    assert len({tuple(row) for row in draws["order"].tolist()}) > 1
    out = augment(crops, torch.Generator().manual_seed(9)).permute(0, 2, 3, 1).double().numpy()
    for i in range(12):
        expected = tf_view(crops[i].permute(1, 2, 0).double().numpy() / 255, draws, i, STRONG)
        np.testing.assert_allclose(out[i], expected, atol=1e-4, err_msg=f"image {i}")


def test_the_per_image_path_computes_the_same_formulas():

    image = torch.randint(
        0, 256, (3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)
    )
    for seed in range(6):
        torch.manual_seed(seed)  # what pretrain.data.Augmented does per image
        ours = OneImagePhotometric(STRONG, 12, 1)(image).permute(1, 2, 0).double().numpy()
        draws = B.BatchPhotometric(STRONG, 12, 1).draw(1, torch.Generator().manual_seed(seed))
        expected = tf_view(image.permute(1, 2, 0).double().numpy() / 255, draws, 0, STRONG)
        np.testing.assert_allclose(ours, expected, atol=1e-4, err_msg=f"seed {seed}")


def test_a_slice_of_the_global_batch_gets_the_views_the_whole_batch_gives_it():
    crops = torch.randint(
        0, 256, (8, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)
    )
    augment = B.BatchPhotometric(AugmentConfig(), 12, 0)
    whole = augment(crops, torch.Generator().manual_seed(2))
    for rank in range(2):  # two processes, four images each
        part = augment(
            crops[4 * rank : 4 * rank + 4],
            torch.Generator().manual_seed(2),
            offset=4 * rank,
            total=8,
        )
        torch.testing.assert_close(part, whole[4 * rank : 4 * rank + 4], atol=1e-6, rtol=0)
