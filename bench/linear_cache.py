"""Linear evaluation with cached features against recomputing the features every epoch (same epochs,
same accuracy), on a Fashion-MNIST subset with a random-init ResNet-18 at 32x32.
    .venv/bin/python bench/linear_cache.py [--train 10000 --test 2000 --epochs 30]
(the Fashion-MNIST protocol: 30 epochs)
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=10000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    import torch
    from omegaconf import OmegaConf

    from pretrain.augment import eval_transform
    from pretrain.data import FashionMNIST
    from transfer.backbone import resolve_backbone
    from transfer.features import FeatureCache, Transformed, cached_features, extract
    from transfer.tasks.linear_knn import LinearProtocol, train_linear

    torch.set_num_threads(2)
    backbone = resolve_backbone("random:resnet18")
    model = backbone.model()
    transform = eval_transform(32, (0.5,) * 3, (0.25,) * 3, 1.0)
    root = "/usr/share/datasets/fashion-mnist"
    train = Transformed(FashionMNIST(root, "train", args.train), transform)
    test = Transformed(FashionMNIST(root, "test", args.test), transform)
    protocol = OmegaConf.structured(LinearProtocol(epochs=args.epochs))
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        cache = FeatureCache(cache_dir)
        train_x, train_y, _ = cached_features(
            backbone, model, train, {"split": "train"}, cache, 256, 0, "cpu"
        )
        test_x, test_y, _ = cached_features(
            backbone, model, test, {"split": "test"}, cache, 256, 0, "cpu"
        )
        cached = train_linear(train_x, train_y, test_x, test_y, 10, protocol, 0, "cpu")
        cached_s = time.perf_counter() - start
    start = time.perf_counter()
    test_x, test_y = extract(model, test, 256, 0, "cpu")
    recomputed = train_linear(
        train_x,
        train_y,
        test_x,
        test_y,
        10,
        protocol,
        0,
        "cpu",
        feature_fn=lambda epoch: extract(model, train, 256, 0, "cpu")[0],
    )
    recomputed_s = time.perf_counter() - start
    print(
        "| protocol | wall time (s) | top-1 (%) |\n|---|---|---|\n| cached features | "
        f"{cached_s:.1f} | "
        f"{cached['top1']:.2f} |\n| features recomputed every epoch | {recomputed_s:.1f} | "
        f"{recomputed['top1']:.2f} |"
    )
    print(
        f"speed-up {recomputed_s / cached_s:.1f}x, same accuracy: "
        f"{cached['top1'] == recomputed['top1']}"
    )


if __name__ == "__main__":
    main()
