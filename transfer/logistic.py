"""Kornblith et al. (2019)'s linear transfer protocol on frozen features, and the metrics its datasets report.

The classifier is multinomial logistic regression fitted by L-BFGS to convergence, minimising

    L(W, b) = (1/N) sum_i CE(W x_i + b, y_i) + (lambda / 2) ||W||^2        (the bias is not penalised)

which is scikit-learn's LogisticRegression objective with C = 1 / (lambda N). The penalty is chosen from 45
log-spaced values in [1e-6, 1e5] by the validation split's metric, then the classifier is refitted on train +
validation with it and scored on test (`select_and_fit`).

Metrics: top-1 accuracy; mean per-class accuracy (the mean over classes of the recall of each class: FGVC
Aircraft, Oxford-IIIT Pets, Caltech-101, Oxford Flowers-102); and VOC2007's 11-point mAP for the multi-label
VOC2007 classification set: per class, AP = (1/11) sum_{t in 0, 0.1, ..., 1} max{precision at recall >= t}, then
the mean over classes.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

PENALTIES = np.logspace(-6, 5, 45)


def fit_logistic(features: Tensor, labels: Tensor, num_classes: int, penalty: float, max_iter: int = 1000,
                 tolerance: float = 1e-10) -> tuple[Tensor, Tensor]:
    """(W [C, D], b [C]) minimising the objective above, by L-BFGS with a strong-Wolfe line search, in float64."""
    x, y = features.double(), labels.long()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=tolerance,
                                  tolerance_change=tolerance * 1e-2, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * penalty * weight.square().sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    return weight.detach(), bias.detach()


def top1(scores: Tensor, labels: Tensor) -> float:
    return 100.0 * (scores.argmax(1) == labels).double().mean().item()


def mean_per_class_accuracy(scores: Tensor, labels: Tensor) -> float:
    """The mean over the classes present in `labels` of the share of their samples predicted right, in %."""
    predicted = scores.argmax(1)
    recalls = [(predicted[labels == c] == c).double().mean().item() for c in labels.unique()]
    return 100.0 * float(np.mean(recalls))


def eleven_point_ap(scores: np.ndarray, positives: np.ndarray) -> float:
    """VOC2007's AP of one class: ranks by score; the mean over t = 0, 0.1, ..., 1 of the best precision at a
    recall of at least t (0 where none reaches t)."""
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(float)
    true_positives = np.cumsum(hits)
    precision = true_positives / np.arange(1, len(hits) + 1)
    recall = true_positives / max(hits.sum(), 1)
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                          for t in np.linspace(0, 1, 11)]))


def voc07_map(scores: Tensor, targets: Tensor) -> float:
    """The mean over classes of `eleven_point_ap`, in %. targets [N, C] as VOC's classification labels: 1 present,
    -1 absent, 0 'difficult' (that image left out of that class's ranking)."""
    s, t = scores.double().numpy(), targets.numpy()
    return 100.0 * float(np.mean([eleven_point_ap(s[t[:, c] != 0, c], t[t[:, c] != 0, c] > 0)
                                  for c in range(t.shape[1])]))


def select_and_fit(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                   num_classes: int, metric=top1, penalties=PENALTIES, max_iter: int = 1000) -> dict:
    """Choose the penalty on val by `metric` (the smallest among ties), refit on train + val, score test.
    Features are standardised with the training split's mean and std."""
    mean, std = train[0].double().mean(0), train[0].double().std(0) + 1e-8

    def scale(x: Tensor) -> Tensor:
        return (x.double() - mean) / std
    on_val = {}
    for penalty in penalties:
        weight, bias = fit_logistic(scale(train[0]), train[1], num_classes, float(penalty), max_iter)
        on_val[float(penalty)] = metric(scale(val[0]) @ weight.T + bias, val[1])
    best = max(on_val, key=lambda p: (on_val[p], -p))
    x = torch.cat([train[0], val[0]])
    weight, bias = fit_logistic(scale(x), torch.cat([train[1], val[1]]), num_classes, best, max_iter)
    return {"penalty": best, "validation": on_val, "test": metric(scale(test[0]) @ weight.T + bias, test[1])}


def fit_binary_logistic(features: Tensor, targets: Tensor, penalty: float, max_iter: int = 1000,
                        tolerance: float = 1e-10) -> tuple[Tensor, Tensor]:
    """One binary logistic regression per class, for multi-label targets [N, C] in VOC's convention (1 present,
    -1 absent, 0 'difficult': left out of that class's loss). Class c minimises

        L_c(w_c, b_c) = (1/N_c) sum_{i: t_ic != 0} BCE(w_c . x_i + b_c, [t_ic > 0]) + (lambda / 2) ||w_c||^2

    (N_c: the entries counted), i.e. scikit-learn's one-vs-rest LogisticRegression with C = 1 / (lambda N_c). The
    objectives are independent, so their sum is minimised jointly by one L-BFGS run, in float64."""
    x, t = features.double(), targets
    known = (t != 0).double()
    positive = (t > 0).double()
    counts = known.sum(0).clamp(min=1)
    weight = torch.zeros(t.shape[1], x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(t.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=tolerance,
                                  tolerance_change=tolerance * 1e-2, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        losses = F.binary_cross_entropy_with_logits(x @ weight.T + bias, positive, reduction="none") * known
        loss = (losses.sum(0) / counts).sum() + 0.5 * penalty * weight.square().sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    return weight.detach(), bias.detach()


def select_and_fit_multilabel(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                              penalties=PENALTIES, max_iter: int = 1000) -> dict:
    """`select_and_fit` for multi-label targets (VOC2007): one binary classifier per class (`fit_binary_logistic`),
    the penalty chosen by the validation split's 11-point mAP, refit on train + val, test mAP."""
    mean, std = train[0].double().mean(0), train[0].double().std(0) + 1e-8

    def scale(x: Tensor) -> Tensor:
        return (x.double() - mean) / std
    on_val = {}
    for penalty in penalties:
        weight, bias = fit_binary_logistic(scale(train[0]), train[1], float(penalty), max_iter)
        on_val[float(penalty)] = voc07_map(scale(val[0]) @ weight.T + bias, val[1])
    best = max(on_val, key=lambda p: (on_val[p], -p))
    weight, bias = fit_binary_logistic(scale(torch.cat([train[0], val[0]])), torch.cat([train[1], val[1]]), best,
                                       max_iter)
    return {"penalty": best, "validation": on_val, "test": voc07_map(scale(test[0]) @ weight.T + bias, test[1])}
