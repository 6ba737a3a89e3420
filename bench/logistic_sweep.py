"""Kornblith et al.'s 45-penalty sweep on cached features: warm-started along the regularisation
path (what transfer.logistic.select_and_fit does) against a naive refit from zero at every penalty,
same solver, same iterations; same chosen penalty and test accuracy expected. Then how far from the
optimum the path's fits are: the largest relative gap (ours - scikit-learn's) / ours of the
objective over the 45 penalties, against scikit-learn's lbfgs at tol 1e-10 started from our solution
(--reference warm: it must find nothing lower; cheap) and also from zero (--reference both;
scikit-learn's lbfgs needs ~10^4 iterations per small penalty on raw features).
    .venv/bin/python bench/logistic_sweep.py [--features fashion|digits] [--train 5000] [--standardize]
        [--reference none|warm|both] [--solver /path/to/an/old/logistic.py]

Features: a random-init ResNet-18's 512-d features of Fashion-MNIST at 32 px (the main job's
setting, cached features), or scikit-learn's digits through a fixed random ReLU projection to 512
dimensions."""

from __future__ import annotations

import argparse
import time


def features(kind: str, n_train: int):
    import torch

    if kind == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float64)
        x = torch.relu(
            x
            @ torch.randn(64, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        )
        y = torch.tensor(digits.target)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
        x, y = x[order], y[order]
        return (x[:1000], y[:1000]), (x[1000:1300], y[1000:1300]), (x[1300:], y[1300:])
    from pretrain.augment import eval_transform
    from pretrain.data import FashionMNIST
    from transfer.backbone import resolve_backbone
    from transfer.features import Transformed, extract

    model = resolve_backbone("random:resnet18").model()
    transform = eval_transform(32, (0.5,) * 3, (0.25,) * 3, 1.0)
    root = "/usr/share/datasets/fashion-mnist"
    train = extract(
        model, Transformed(FashionMNIST(root, "train", n_train + 1000), transform), 500, 0, "cpu"
    )
    test = extract(model, Transformed(FashionMNIST(root, "test", 1000), transform), 500, 0, "cpu")
    return (train[0][:n_train], train[1][:n_train]), (train[0][n_train:], train[1][n_train:]), test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", choices=("fashion", "digits"), default="fashion")
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument(
        "--standardize", action="store_true", help="features standardised with train's mean/std"
    )
    parser.add_argument("--reference", choices=("none", "warm", "both"), default="warm")
    parser.add_argument(
        "--solver", default="", help="a transfer/logistic.py to time instead (e.g. an old copy)"
    )
    parser.add_argument("--no-cold", action="store_true", help="skip the naive sweep")
    args = parser.parse_args()
    import torch

    if args.solver:
        import importlib.util

        spec = importlib.util.spec_from_file_location("logistic_under_test", args.solver)
        logistic = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(logistic)
    else:
        from transfer import logistic
    torch.set_num_threads(2)
    train, val, test = features(args.features, args.train)
    # by hand, so that an old module (which always standardised) sees the same features
    if args.standardize:
        mean, std = train[0].double().mean(0), train[0].double().std(0) + 1e-8
        train, val, test = (((x.double() - mean) / std, y) for x, y in (train, val, test))
    extra = {} if args.solver else {"standardize": False}
    start = time.perf_counter()
    warm = logistic.select_and_fit(train, val, test, 10, **extra)
    warm_s = time.perf_counter() - start

    def cold_fit(x, y, penalty, start):  # the naive sweep: every penalty from zero
        return logistic.fit_logistic(x, y, 10, penalty)

    start = time.perf_counter()
    cold = (
        warm
        if args.no_cold
        else logistic._select(
            train, val, test, logistic.PENALTIES, cold_fit, logistic.top1, **extra
        )
    )
    cold_s = time.perf_counter() - start
    differing = sum(warm["validation"][p] != cold["validation"][p] for p in warm["validation"])
    print(
        f"features {args.features}: train {len(train[1])}, val {len(val[1])}, test {len(test[1])}, "
        f"dim {train[0].shape[1]}"
    )
    print(
        f"warm-started path: {warm_s:.1f} s, penalty {warm['penalty']:.3g}, test top-1 "
        f"{warm['test']:.2f}"
    )
    print(
        f"naive cold refits: {cold_s:.1f} s, penalty {cold['penalty']:.3g}, test top-1 "
        f"{cold['test']:.2f}"
    )
    print(
        f"speed-up {cold_s / warm_s:.2f}x; penalties whose validation top-1 differs: {differing} "
        f"of 45"
    )
    if args.reference != "none":
        gaps(logistic, train, args.reference == "both")


def gaps(logistic, train, from_zero: bool) -> None:
    """The path's fits on train (as select_and_fit makes them) against scikit-learn's at every
    penalty."""
    import warnings

    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x, y = train[0].double(), train[1]
    # the old module standardised inside _select
    if getattr(logistic, "_LinearObjective", None) is None:
        x = (x - x.mean(0)) / (x.std(0) + 1e-8)

    def objective(weight, bias, penalty):
        weight, bias = (
            torch.as_tensor(weight, dtype=torch.float64),
            torch.as_tensor(bias, dtype=torch.float64),
        )
        return (
            torch.nn.functional.cross_entropy(x @ weight.T + bias, y)
            + 0.5 * penalty * weight.square().sum()
        ).item()

    worst, unconverged, fit = (-float("inf"), None), 0, None
    for penalty in sorted(logistic.PENALTIES, reverse=True):
        fit = logistic.fit_logistic(x, y, 10, float(penalty), start=fit)
        ours = objective(*fit, penalty)
        references = []
        if from_zero:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model = LogisticRegression(
                    C=1 / (penalty * len(y)), tol=1e-10, max_iter=100_000
                ).fit(x.numpy(), y.numpy())
            unconverged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
            references.append(objective(model.coef_, model.intercept_, penalty))
        model = LogisticRegression(
            C=1 / (penalty * len(y)), tol=1e-10, max_iter=100_000, warm_start=True
        )
        model.coef_ = (fit[0] - fit[0].mean(0)).numpy().copy()
        model.intercept_ = (fit[1] - fit[1].mean()).numpy().copy()
        model.fit(x.numpy(), y.numpy())
        references.append(objective(model.coef_, model.intercept_, penalty))
        gap = (ours - min(references)) / ours
        worst = max(worst, (gap, penalty))
    print(
        "largest relative objective gap to scikit-learn (lbfgs, tol "
        f"1e-10{', from zero and' if from_zero else ''}"
        f" from our solution) over the 45 penalties: {worst[0]:.2e} at penalty {worst[1]:.3g}"
        + (
            f"; scikit-learn from zero stopped unconverged at {unconverged} of 45"
            if from_zero
            else ""
        )
    )


if __name__ == "__main__":
    main()
