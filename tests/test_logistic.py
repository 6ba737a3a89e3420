"""Kornblith et al.'s linear protocol: the L-BFGS logistic regression against scikit-learn's, and
the metrics of
the transfer datasets by hand."""

import math

import numpy as np
import pytest
import torch

from transfer.logistic import (
    PENALTIES,
    eleven_point_ap,
    fit_logistic,
    mean_per_class_accuracy,
    select_and_fit,
    top1,
    voc07_map,
)


def blobs(n, d=6, classes=3, seed=0, spread=1.5):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * 2
    labels = torch.arange(n) % classes
    return centres[labels] + spread * torch.randn(n, d, generator=generator), labels


@pytest.mark.parametrize("penalty", [1e-3, 1e-1, 10.0])
def test_lbfgs_logistic_regression_matches_scikit_learns(penalty):
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(150)
    weight, bias = fit_logistic(x, y, 3, penalty)
    reference = LogisticRegression(C=1 / (penalty * len(y)), tol=1e-12, max_iter=100_000).fit(
        x.numpy(), y.numpy()
    )
    # softmax is invariant to a shift shared by all classes: scikit-learn's intercepts sum to 0,
    # compare centred
    np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(
        (bias - bias.mean()).numpy(), reference.intercept_ - reference.intercept_.mean(), atol=1e-4
    )
    test_x, test_y = blobs(90, seed=1)
    ours = (test_x.double() @ weight.T + bias).argmax(1).numpy()
    assert (ours == reference.predict(test_x.numpy())).all()


def test_mean_per_class_accuracy_by_hand():
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    # class 0: 3 of 4, class 1: 1 of 1, class 2: 0 of 1
    predicted = torch.tensor([0, 0, 0, 1, 1, 0])
    scores = torch.nn.functional.one_hot(predicted, 3).double()
    assert mean_per_class_accuracy(scores, labels) == pytest.approx(100 * (0.75 + 1 + 0) / 3)
    assert top1(scores, labels) == pytest.approx(100 * 4 / 6)  # what the mean per class is not


def test_eleven_point_ap_and_voc07_map_by_hand():
    # ranked: +, -, +, -  -> precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1
    scores, positives = np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, False, True, False])
    # t <= 0.5 reach precision 1; t > 0.5 only at recall 1: 2/3
    expected = (6 * 1 + 5 * (2 / 3)) / 11
    assert eleven_point_ap(scores, positives) == pytest.approx(expected)
    # the same class in VOC's labels, plus a 'difficult' (0) image scored highest: left out, not a
    # false positive
    s = torch.tensor([[0.95], [0.9], [0.8], [0.7], [0.6]])
    t = torch.tensor([[0], [1], [-1], [1], [-1]])
    assert voc07_map(s, t) == pytest.approx(100 * expected)
    # counted as a negative it heads the ranking: precision 0, 1/2, 1/3, 1/2, 2/5 at recall 0, 1/2,
    # 1/2, 1, 1, so the best precision at every recall threshold is 1/2
    assert voc07_map(s, torch.tensor([[-1], [1], [-1], [1], [-1]])) == pytest.approx(50.0)


def test_the_penalty_is_chosen_on_validation_and_the_refit_scores_test():
    train, val, test = (
        blobs(120, seed=2, spread=3.0),
        blobs(60, seed=3, spread=3.0),
        blobs(60, seed=4, spread=3.0),
    )
    penalties = [1e-6, 1e-2, 1e2]
    result = select_and_fit(train, val, test, 3, top1, penalties)
    assert set(result["validation"]) == set(penalties)
    assert result["validation"][result["penalty"]] == max(result["validation"].values())
    assert 0 <= result["test"] <= 100 and not math.isnan(result["test"])
    # too strong: near-uniform scores
    assert result["validation"][1e2] < result["validation"][result["penalty"]]


def centred(bias):
    return bias - bias.mean()


def cold_sweep(train, val, test, num_classes, penalties):
    """The sweep as first written: every penalty fitted from zero, in the order given, on the raw
    features (the default); the smallest penalty among the best on val refitted from zero on train +
    val.
    -> (penalty, {penalty: val top-1}, test top-1)"""
    on_val = {}
    for penalty in penalties:
        weight, bias = fit_logistic(train[0], train[1], num_classes, float(penalty))
        on_val[float(penalty)] = top1(val[0].double() @ weight.T + bias, val[1])
    best = max(on_val, key=lambda p: (on_val[p], -p))
    weight, bias = fit_logistic(
        torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]), num_classes, best
    )
    return best, on_val, top1(test[0].double() @ weight.T + bias, test[1])


def test_the_warm_started_sweep_scores_as_cold_started_fits():
    # 4 overlapping classes: val top-1 rises from 89.2 to 95.8 then falls back, with ties at both
    # ends
    train, val, test = (
        blobs(n, d=8, classes=4, seed=seed, spread=2.5)
        for n, seed in ((240, 5), (120, 6), (120, 7))
    )
    result = select_and_fit(train, val, test, 4)
    penalty, on_val, on_test = cold_sweep(train, val, test, 4, PENALTIES)
    assert len(set(on_val.values())) >= 5  # the penalty matters on this problem
    assert result["validation"] == on_val  # every one of the 45 penalties, exactly
    assert (
        result["penalty"]
        == penalty
        == min(p for p, v in on_val.items() if v == max(on_val.values()))
    )
    assert result["test"] == on_test
    # the path is fitted from the largest penalty down whatever order the penalties come in
    shuffled = np.random.default_rng(0).permutation(PENALTIES)
    assert select_and_fit(train, val, test, 4, top1, shuffled) == result


@pytest.mark.parametrize("penalty", [1e-4, 1e-3, 1e-1, 10.0])
def test_a_warm_start_reaches_the_cold_starts_optimum(penalty):
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(150)
    cold = fit_logistic(x, y, 3, penalty)
    # from the solution at the next larger penalty of the sweep's grid (what select_and_fit does),
    # and from far away
    along_the_path = fit_logistic(x, y, 3, penalty, start=fit_logistic(x, y, 3, penalty * 10**0.25))
    generator = torch.Generator().manual_seed(0)
    start = (
        3 * torch.randn(3, 6, generator=generator, dtype=torch.float64),
        3 * torch.randn(3, generator=generator, dtype=torch.float64),
    )
    far = fit_logistic(x, y, 3, penalty, start=start)
    reference = LogisticRegression(C=1 / (penalty * len(y)), tol=1e-12, max_iter=100_000).fit(
        x.numpy(), y.numpy()
    )
    for weight, bias in (along_the_path, far):
        np.testing.assert_allclose(weight.numpy(), cold[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(centred(bias).numpy(), centred(cold[1]).numpy(), atol=1e-4)
        np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=1e-4, rtol=1e-4)
    # the optimum is unique up to a shift of the bias shared by all classes (softmax ignores it),
    # and L-BFGS keeps the start's: every gradient's bias part sums to 0
    assert far[1].sum().item() == pytest.approx(start[1].sum().item(), abs=1e-9)
    assert cold[1].sum().item() == pytest.approx(0, abs=1e-9)


def digits_features(standardize: bool):
    """scikit-learn's digits (first 400 images) through a fixed random ReLU projection to 128
    dimensions (as
    bench/logistic_sweep.py, smaller): raw features of very different scales (some constant 0), or
    standardised."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:400], dtype=torch.float64)
    x = torch.relu(
        x @ torch.randn(64, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    if standardize:
        x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    return x, torch.tensor(digits.target[:400])


@pytest.mark.parametrize("standardize", [False, True])
def test_every_penalty_of_the_sweep_reaches_scikit_learns_objective(standardize):
    """Along the warm-started path of all 45 penalties (what select_and_fit fits), the objective is
    within 1e-8 relative of scikit-learn's lbfgs run to convergence (tol 1e-10; where scikit-learn
    stops first, e.g. on its relative-decrease test, ours may be lower). On the raw features
    scikit-learn's lbfgs needs up to ~10^4
    iterations at small penalties, so it starts from our solution there (warm_start): it must find
    nothing lower."""
    from sklearn.linear_model import LogisticRegression

    x, y = digits_features(standardize)

    def objective(weight, bias, penalty):
        weight, bias = (
            torch.as_tensor(weight, dtype=torch.float64),
            torch.as_tensor(bias, dtype=torch.float64),
        )
        return (
            torch.nn.functional.cross_entropy(x @ weight.T + bias, y)
            + 0.5 * penalty * weight.square().sum()
        ).item()

    start, gaps = None, {}
    for penalty in sorted(PENALTIES, reverse=True):
        start = fit_logistic(x, y, 10, float(penalty), start=start)
        ours = objective(*start, penalty)
        reference = LogisticRegression(
            C=1 / (penalty * len(y)), tol=1e-10, max_iter=100_000, warm_start=True
        )
        if not standardize:  # from our solution, centred as scikit-learn's
            reference.coef_ = (start[0] - start[0].mean(0)).numpy().copy()
            reference.intercept_ = centred(start[1]).numpy().copy()
        reference.fit(x.numpy(), y.numpy())
        assert reference.n_iter_[0] < 100_000
        gaps[penalty] = (ours - objective(reference.coef_, reference.intercept_, penalty)) / ours
    assert max(gaps.values()) < 1e-8, max(gaps.items(), key=lambda item: item[1])
