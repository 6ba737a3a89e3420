"""Kornblith et al.'s linear protocol: the L-BFGS logistic regression against scikit-learn's, and the metrics of
the transfer datasets by hand."""
import math

import numpy as np
import pytest
import torch

from transfer.logistic import (eleven_point_ap, fit_logistic, mean_per_class_accuracy, select_and_fit, top1,
                               voc07_map)


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
    reference = LogisticRegression(C=1 / (penalty * len(y)), tol=1e-12, max_iter=100_000).fit(x.numpy(), y.numpy())
    # softmax is invariant to a shift shared by all classes: scikit-learn's intercepts sum to 0, compare centred
    np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose((bias - bias.mean()).numpy(), reference.intercept_ - reference.intercept_.mean(),
                               atol=1e-4)
    test_x, test_y = blobs(90, seed=1)
    ours = (test_x.double() @ weight.T + bias).argmax(1).numpy()
    assert (ours == reference.predict(test_x.numpy())).all()


def test_mean_per_class_accuracy_by_hand():
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    predicted = torch.tensor([0, 0, 0, 1, 1, 0])  # class 0: 3 of 4, class 1: 1 of 1, class 2: 0 of 1
    scores = torch.nn.functional.one_hot(predicted, 3).double()
    assert mean_per_class_accuracy(scores, labels) == pytest.approx(100 * (0.75 + 1 + 0) / 3)
    assert top1(scores, labels) == pytest.approx(100 * 4 / 6)  # what the mean per class is not


def test_eleven_point_ap_and_voc07_map_by_hand():
    # ranked: +, -, +, -  -> precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1
    scores, positives = np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, False, True, False])
    expected = (6 * 1 + 5 * (2 / 3)) / 11  # t <= 0.5 reach precision 1; t > 0.5 only at recall 1: 2/3
    assert eleven_point_ap(scores, positives) == pytest.approx(expected)
    # the same class in VOC's labels, plus a 'difficult' (0) image scored highest: left out, not a false positive
    s = torch.tensor([[0.95], [0.9], [0.8], [0.7], [0.6]])
    t = torch.tensor([[0], [1], [-1], [1], [-1]])
    assert voc07_map(s, t) == pytest.approx(100 * expected)
    # counted as a negative it heads the ranking: precision 0, 1/2, 1/3, 1/2, 2/5 at recall 0, 1/2, 1/2, 1, 1,
    # so the best precision at every recall threshold is 1/2
    assert voc07_map(s, torch.tensor([[-1], [1], [-1], [1], [-1]])) == pytest.approx(50.0)


def test_the_penalty_is_chosen_on_validation_and_the_refit_scores_test():
    train, val, test = blobs(120, seed=2, spread=3.0), blobs(60, seed=3, spread=3.0), blobs(60, seed=4, spread=3.0)
    penalties = [1e-6, 1e-2, 1e2]
    result = select_and_fit(train, val, test, 3, top1, penalties)
    assert set(result["validation"]) == set(penalties)
    assert result["validation"][result["penalty"]] == max(result["validation"].values())
    assert 0 <= result["test"] <= 100 and not math.isnan(result["test"])
    assert result["validation"][1e2] < result["validation"][result["penalty"]]  # too strong: near-uniform scores
