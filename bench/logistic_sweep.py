"""Kornblith et al.'s 45-penalty sweep on cached features: warm-started along the regularisation path (what
transfer.logistic.select_and_fit does) against a naive refit from zero at every penalty, same solver, same
iterations; same chosen penalty and test accuracy expected.
    .venv/bin/python bench/logistic_sweep.py [--features fashion|digits] [--train 5000]

Features: a random-init ResNet-18's 512-d features of Fashion-MNIST at 32 px (the main job's setting, cached
features), or scikit-learn's digits through a fixed random ReLU projection to 512 dimensions.
"""
from __future__ import annotations

import argparse
import time


def features(kind: str, n_train: int):
    import torch
    if kind == "digits":
        from sklearn.datasets import load_digits
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float64)
        x = torch.relu(x @ torch.randn(64, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        y = torch.tensor(digits.target)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
        x, y = x[order], y[order]
        return (x[:1000], y[:1000]), (x[1000:1300], y[1000:1300]), (x[1300:], y[1300:])
    from pretrain.augment import eval_transform
    from pretrain.data import FashionMNIST
    from transfer.backbone import resolve_backbone
    from transfer.tasks.classification import Transformed, extract
    model = resolve_backbone("random:resnet18").model()
    transform = eval_transform(32, (0.5,) * 3, (0.25,) * 3, 1.0)
    root = "/usr/share/datasets/fashion-mnist"
    train = extract(model, Transformed(FashionMNIST(root, "train", n_train + 1000), transform), 500, 0, "cpu")
    test = extract(model, Transformed(FashionMNIST(root, "test", 1000), transform), 500, 0, "cpu")
    return (train[0][:n_train], train[1][:n_train]), (train[0][n_train:], train[1][n_train:]), test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", choices=("fashion", "digits"), default="fashion")
    parser.add_argument("--train", type=int, default=5000)
    args = parser.parse_args()
    import torch
    from transfer import logistic
    torch.set_num_threads(2)
    train, val, test = features(args.features, args.train)
    start = time.perf_counter()
    warm = logistic.select_and_fit(train, val, test, 10)
    warm_s = time.perf_counter() - start

    def cold_fit(x, y, penalty, start):  # the naive sweep: every penalty from zero
        return logistic.fit_logistic(x, y, 10, penalty)
    start = time.perf_counter()
    cold = logistic._select(train, val, test, logistic.PENALTIES, cold_fit, logistic.top1)
    cold_s = time.perf_counter() - start
    differing = sum(warm["validation"][p] != cold["validation"][p] for p in warm["validation"])
    print(f"features {args.features}: train {len(train[1])}, val {len(val[1])}, test {len(test[1])}, "
          f"dim {train[0].shape[1]}")
    print(f"warm-started path: {warm_s:.1f} s, penalty {warm['penalty']:.3g}, test top-1 {warm['test']:.2f}")
    print(f"naive cold refits: {cold_s:.1f} s, penalty {cold['penalty']:.3g}, test top-1 {cold['test']:.2f}")
    print(f"speed-up {cold_s / warm_s:.2f}x; penalties whose validation top-1 differs: {differing} of 45")


if __name__ == "__main__":
    main()
