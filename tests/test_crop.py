"""The pretraining / linear-evaluation crop (pretrain.augment.InceptionCrop, official_crop_box)
against an independent NumPy implementation of the official code's sampler, BYOL's
`_decode_and_random_crop` (deepmind-research byol/utils/dataset.py:206-233, which SSL-HSIC's
official code imports): the two are compared as
distributions (area, placement), since they draw from different generators."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats  # noqa: TID253 (its tests are what this module is about)
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from pretrain.augment import InceptionCrop, byol_crop_transform, official_crop_box
from pretrain.schema import AugmentConfig

# draws of the module under test per image shape (~1 s each); the NumPy reference draws 10x as many
N = 12_000
SHAPES = [(300, 400), (400, 300), (300, 300)]  # (H, W): 4:3 landscape, 3:4 portrait, square


def reference_boxes(height, width, n, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """n boxes (top, left, h, w) as arrays, written from the TensorFlow ops of
    byol/utils/dataset.py:209-229:
    area = float32(H*W); target_area = uniform[s0, s1) * area; aspect = exp(uniform[log r0, log r1));
    w = round(sqrt(target_area * aspect)), h = round(sqrt(target_area / aspect)) (tf.round: half to even, as
    np.round); w = min(w, W), h = min(h, H); offset_w ~ uniform int [0, W - w], offset_h ~ uniform int [0, H - h]."""
    f32 = np.float32
    area = f32(height * width)
    target_area = (f32(scale[0]) + f32(scale[1] - scale[0]) * rng.random(n, dtype=f32)) * area
    lo, hi = np.log(f32(ratio[0])), np.log(f32(ratio[1]))
    aspect = np.exp(lo + (hi - lo) * rng.random(n, dtype=f32))
    w = np.minimum(np.round(np.sqrt(target_area * aspect)).astype(np.int64), width)
    h = np.minimum(np.round(np.sqrt(target_area / aspect)).astype(np.int64), height)
    # numpy's high is exclusive, like tf.random.uniform's maxval
    left = rng.integers(0, width - w + 1)
    top = rng.integers(0, height - h + 1)
    return top, left, h, w


def module_boxes(height, width, n, seed, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return np.array(
        [official_crop_box(height, width, generator=generator, **kwargs) for _ in range(n)]
    ).T


def torchvision_boxes(height, width, n, seed):
    torch.manual_seed(seed)
    crop, image = v2.RandomResizedCrop(8), torch.zeros(1, height, width)
    boxes = [crop.make_params([image]) for _ in range(n)]
    return np.array([(b["top"], b["left"], b["height"], b["width"]) for b in boxes]).T


@pytest.fixture(scope="module")
def draws():
    """{shape: (module's boxes, reference boxes)}"""
    rng = np.random.default_rng(0)
    return {
        shape: (module_boxes(*shape, N, seed=i), reference_boxes(*shape, 10 * N, rng))
        for i, shape in enumerate(SHAPES)
    }


def area(boxes, shape):
    return boxes[2] * boxes[3] / (shape[0] * shape[1])


@pytest.mark.parametrize("shape", SHAPES)
def test_area_distribution_matches_the_reference(draws, shape):
    ours, reference = (area(b, shape) for b in draws[shape])
    se = ours.std() / N**0.5
    assert abs(ours.mean() - reference.mean()) < 5 * se
    p_ours, p_ref = (ours > 0.5).mean(), (reference > 0.5).mean()
    assert abs(p_ours - p_ref) < 5 * (p_ref * (1 - p_ref) / N) ** 0.5
    assert stats.ks_2samp(ours, reference).pvalue > 1e-4
    for side in (2, 3):  # the clipped heights and widths, each
        assert stats.ks_2samp(draws[shape][0][side], draws[shape][1][side]).pvalue > 1e-4


def test_mean_area_on_4_3_images_is_the_official_one_not_torchvisions(draws):
    """0.519 and P(area > 0.5) = 0.543 by the reference at 400,000 draws; torchvision's
    RandomResizedCrop gives 0.43
    and 0.39 (its boxes that overflow are redrawn, not clipped)."""
    ours = area(draws[(300, 400)][0], (300, 400))
    assert abs(ours.mean() - 0.519) < 0.01 and abs((ours > 0.5).mean() - 0.543) < 0.02
    theirs = area(torchvision_boxes(300, 400, N // 2, seed=0), (300, 400))
    assert theirs.mean() < 0.45 and (theirs > 0.5).mean() < 0.42
    # the KS test above can tell the two samplers apart
    assert stats.ks_2samp(ours, theirs).pvalue < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_offsets_are_uniform_over_the_allowed_range(draws, shape):
    height, width = shape
    ours, reference = draws[shape]
    for offset, side, size in [(0, 2, height), (1, 3, width)]:
        room = size - ours[side] + 1  # number of allowed offsets
        # offset + U(0, 1) over the number of allowed offsets is U(0, 1) exactly when the offset is
        # uniform
        u = (ours[offset] + np.random.default_rng(offset).random(N)) / room
        assert abs(u.mean() - 0.5) < 5 * (1 / 12 / N) ** 0.5
        # Var of (U - 1/2)^2 is 1/80 - 1/144 = 1/180
        assert abs(u.var() - 1 / 12) < 5 * (1 / 180 / N) ** 0.5
        assert stats.kstest(u, "uniform").pvalue > 1e-4
        movable = room > 1  # offsets normalised by their range, against the reference's
        normalised = ours[offset][movable] / (room[movable] - 1)
        ref_room = size - reference[side] + 1
        ref_normalised = reference[offset][ref_room > 1] / (ref_room[ref_room > 1] - 1)
        assert stats.ks_2samp(normalised, ref_normalised).pvalue > 1e-4


@pytest.mark.parametrize("shape", SHAPES + [(1, 1), (2, 3), (7, 1000), (1000, 7), (64, 64)])
def test_every_box_lies_inside_the_image(shape):
    height, width = shape
    for scale, ratio in [
        ((0.08, 1.0), (3 / 4, 4 / 3)),
        ((0.0, 1.0), (0.1, 10.0)),
        ((1.0, 1.0), (1.0, 1.0)),
    ]:
        top, left, h, w = module_boxes(height, width, 500, seed=1, scale=scale, ratio=ratio)
        assert (h >= 1).all() and (w >= 1).all() and (h <= height).all() and (w <= width).all()
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= height).all() and (left + w <= width).all()


def test_full_scale_square_ratio_on_a_square_image_is_the_whole_image():
    assert set(
        map(tuple, module_boxes(50, 50, 50, seed=0, scale=(1.0, 1.0), ratio=(1.0, 1.0)).T)
    ) == {(0, 0, 50, 50)}


def test_the_transform_crops_its_box_and_is_deterministic_under_torch_manual_seed():
    image = torch.randint(
        0, 256, (3, 40, 60), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    crop = InceptionCrop(16)
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        outputs.append(crop(image))
    assert outputs[0].dtype == torch.uint8 and outputs[0].shape == (3, 16, 16)
    assert torch.equal(outputs[0], outputs[1])
    torch.manual_seed(123)
    top, left, h, w = official_crop_box(40, 60)  # the global generator, drawn the same way
    expected = F.resized_crop(
        image, top, left, h, w, [16, 16], interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    assert torch.equal(outputs[0], expected)
    torch.manual_seed(124)
    assert not torch.equal(crop(image), outputs[0])


def test_a_generator_leaves_the_global_one_alone():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = official_crop_box(30, 40, generator=torch.Generator().manual_seed(9))
    assert torch.equal(torch.get_rng_state(), state)
    assert first == official_crop_box(30, 40, generator=torch.Generator().manual_seed(9))


def test_pil_images_and_the_pretraining_crop_transform():
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    torch.manual_seed(0)
    out = InceptionCrop(24)(pil)
    assert isinstance(out, Image.Image) and out.size == (24, 24)
    transform = byol_crop_transform(AugmentConfig(), 24)
    assert any(isinstance(t, InceptionCrop) for t in transform.transforms)
    assert not any(type(t) is v2.RandomResizedCrop for t in transform.transforms)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(transform(pil))
    assert (
        runs[0].dtype == torch.uint8
        and runs[0].shape == (3, 24, 24)
        and torch.equal(runs[0], runs[1])
    )
