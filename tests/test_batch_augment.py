"""The batched photometric augmentation (pretrain/batch_augment.py) against torchvision's per-image ops."""
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from pretrain import batch_augment as B
from pretrain.schema import AugmentConfig


@pytest.fixture
def images():
    return torch.rand(6, 3, 16, 20, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ours, theirs", [
    (B.adjust_brightness, F.adjust_brightness),
    (B.adjust_contrast, F.adjust_contrast),
    (B.adjust_saturation, F.adjust_saturation),
])
def test_jitter_factors_match_torchvision_per_sample(images, ours, theirs):
    factors = torch.tensor([0.0, 0.6, 0.9, 1.0, 1.2, 1.4])
    expected = torch.stack([theirs(image, float(f)) for image, f in zip(images, factors)])
    torch.testing.assert_close(ours(images.clone(), factors), expected, atol=1e-6, rtol=0)


def test_hue_matches_torchvision_and_zero_shift_is_identity(images):
    shifts = torch.tensor([-0.5, -0.1, -0.03, 0.0, 0.05, 0.1])
    expected = torch.stack([F.adjust_hue(image, float(h)) for image, h in zip(images, shifts)])
    torch.testing.assert_close(B.adjust_hue(images, shifts), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(B.adjust_hue(images, torch.zeros(6)), images, atol=1e-5, rtol=0)


def test_blur_matches_torchvision_and_sigma_zero_is_identity(images):
    sigmas = torch.tensor([0.0, 0.1, 0.5, 1.0, 1.5, 2.0])
    expected = torch.stack([F.gaussian_blur(image, [5, 5], [float(s)] * 2) if s > 0 else image
                            for image, s in zip(images, sigmas)])
    torch.testing.assert_close(B.gaussian_blur(images, sigmas, 5), expected, atol=1e-6, rtol=0)


def test_solarize_and_grayscale_match_torchvision(images):
    as_uint8 = (images * 255).round().to(torch.uint8)
    expected = torch.stack([F.solarize(image, 128) for image in as_uint8]).float() / 255
    apply = torch.tensor([True, True, False, True, False, True])
    expected = torch.where(apply.view(-1, 1, 1, 1), expected, as_uint8.float() / 255)
    torch.testing.assert_close(B.solarize(as_uint8.float() / 255, apply), expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(B.grayscale(images), F.rgb_to_grayscale(images), atol=1e-6, rtol=0)


def test_with_every_step_off_it_only_normalises():
    config = AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0))
    crops = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = B.BatchPhotometric(config, 12, 0)(crops, torch.Generator().manual_seed(0))
    expected = F.normalize(crops.float() / 255, list(config.mean), list(config.std))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("view, blur, solarize", [(0, 1.0, 0.0), (1, 0.1, 0.2)])
def test_draws_follow_the_configured_probabilities_and_ranges(view, blur, solarize):
    """Each rate is a binomial proportion over n = 20,000 samples: within 5 standard errors."""
    config, n = AugmentConfig(), 20_000
    draws = B.BatchPhotometric(config, 32, view).draw(n, torch.Generator().manual_seed(view))
    jittered = draws["brightness"] != 1.0
    for rate, p in [(jittered.float().mean(), config.jitter_p), (draws["grayscale"].float().mean(), config.grayscale_p),
                    ((draws["sigma"] > 0).float().mean(), blur), (draws["solarize"].float().mean(), solarize)]:
        assert abs(rate.item() - p) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-12
    assert draws["brightness"][jittered].min() >= 0.6 and draws["brightness"][jittered].max() <= 1.4
    assert draws["hue"].abs().max() <= config.hue and (draws["hue"][~jittered] == 0).all()
    sigma = draws["sigma"][draws["sigma"] > 0]
    if len(sigma):
        assert sigma.min() >= config.blur_sigma[0] and sigma.max() <= config.blur_sigma[1]
    assert sorted(draws["order"].tolist()) == [0, 1, 2, 3]


def test_the_same_generator_state_gives_the_same_views():
    crops = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    augment = B.BatchPhotometric(AugmentConfig(), 16, 0)
    first = augment(crops, torch.Generator().manual_seed(5))
    assert torch.equal(first, augment(crops, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, augment(crops, torch.Generator().manual_seed(6)))
