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


SMALL_WORK = 20_000_000  # multiply-adds per evaluation below which one thread is faster than several


def _lbfgs(objective, start: np.ndarray, max_iter: int, tolerance: float, work: int) -> np.ndarray:
    """scipy's L-BFGS-B (the solver behind scikit-learn's lbfgs) on a float64 objective returning (value, gradient),
    until the largest gradient entry is below `tolerance` or `max_iter` iterations.

    A small problem (`work` multiply-adds per evaluation) runs on one thread: its tensors are too small to split,
    and on a machine whose other cores are busy every parallel region would wait for a descheduled thread."""
    from scipy.optimize import minimize
    threads = torch.get_num_threads()
    if work < SMALL_WORK:
        torch.set_num_threads(1)
    try:
        result = minimize(objective, start, jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter, "gtol": tolerance, "ftol": 64 * np.finfo(float).eps,
                                   "maxcor": 20})
    finally:
        torch.set_num_threads(threads)
    return result.x


def fit_logistic(features: Tensor, labels: Tensor, num_classes: int, penalty: float, max_iter: int = 1000,
                 tolerance: float = 1e-8, start: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(W [C, D], b [C]) minimising the objective above by L-BFGS in float64, with its exact gradient

        dL/dW = (P - Y)^T X / N + lambda W,    dL/db = sum_i (p_i - y_i) / N

    (P the softmax probabilities, Y the one-hot labels); from `start` (warm start) or from zero."""
    x, y = features.double(), labels.long()
    n, d = x.shape
    onehot = F.one_hot(y, num_classes).double()

    def objective(theta: np.ndarray):
        w = torch.from_numpy(theta[:num_classes * d]).view(num_classes, d)
        b = torch.from_numpy(theta[num_classes * d:])
        log_p = torch.addmm(b, x, w.T).log_softmax(1)
        residual = (log_p.exp() - onehot) / n
        value = -(log_p * onehot).sum().item() / n + 0.5 * penalty * w.square().sum().item()
        gradient = torch.cat([(residual.T @ x + penalty * w).reshape(-1), residual.sum(0)])
        return value, gradient.numpy()
    theta0 = (np.zeros(num_classes * (d + 1)) if start is None
              else torch.cat([start[0].double().reshape(-1), start[1].double()]).numpy())
    theta = torch.from_numpy(_lbfgs(objective, theta0, max_iter, tolerance, n * d * num_classes))
    return theta[:num_classes * d].view(num_classes, d).clone(), theta[num_classes * d:].clone()


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
    Features are standardised with the training split's mean and std. The penalties are fitted along the
    regularisation path, from the largest down, each fit starting from the previous one's solution. The objective
    is strictly convex in W and in b up to a shift shared by all classes, which the softmax ignores (L-BFGS keeps
    the biases' sum where it starts): the start changes the path to the optimum, not the predictions there."""
    return _select(train, val, test, penalties,
                   lambda x, y, penalty, start: fit_logistic(x, y, num_classes, penalty, max_iter, start=start),
                   metric)


def _select(train, val, test, penalties, fit, metric) -> dict:
    mean, std = train[0].double().mean(0), train[0].double().std(0) + 1e-8
    train_x, val_x, test_x = ((x.double() - mean) / std for x in (train[0], val[0], test[0]))
    on_val, start = {}, None
    for penalty in sorted((float(p) for p in penalties), reverse=True):
        start = fit(train_x, train[1], penalty, start)
        on_val[penalty] = metric(val_x @ start[0].T + start[1], val[1])
    best = max(on_val, key=lambda p: (on_val[p], -p))
    weight, bias = fit(torch.cat([train_x, val_x]), torch.cat([train[1], val[1]]), best, None)
    return {"penalty": best, "validation": dict(sorted(on_val.items())),
            "test": metric(test_x @ weight.T + bias, test[1])}


def fit_binary_logistic(features: Tensor, targets: Tensor, penalty: float, max_iter: int = 1000,
                        tolerance: float = 1e-8, start: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """One binary logistic regression per class, for multi-label targets [N, C] in VOC's convention (1 present,
    -1 absent, 0 'difficult': left out of that class's loss). Class c minimises

        L_c(w_c, b_c) = (1/N_c) sum_{i: t_ic != 0} BCE(w_c . x_i + b_c, [t_ic > 0]) + (lambda / 2) ||w_c||^2

    (N_c: the entries counted), i.e. scikit-learn's LogisticRegression on that class with C = 1 / (lambda N_c). The
    objectives are independent, so their sum is minimised jointly by one L-BFGS run, in float64, with the gradient
    dL_c/dw_c = sum_i m_ic (sigmoid(z_ic) - y_ic) x_i / N_c + lambda w_c (m_ic: entry counted)."""
    x = features.double()
    known = (targets != 0).double()
    positive = (targets > 0).double()
    counts = known.sum(0).clamp(min=1)
    c, d = targets.shape[1], x.shape[1]

    def objective(theta: np.ndarray):
        w = torch.from_numpy(theta[:c * d]).view(c, d)
        b = torch.from_numpy(theta[c * d:])
        z = torch.addmm(b, x, w.T)
        losses = F.binary_cross_entropy_with_logits(z, positive, reduction="none") * known
        value = (losses.sum(0) / counts).sum().item() + 0.5 * penalty * w.square().sum().item()
        residual = (torch.sigmoid(z) - positive) * known / counts
        gradient = torch.cat([(residual.T @ x + penalty * w).reshape(-1), residual.sum(0)])
        return value, gradient.numpy()
    theta0 = (np.zeros(c * (d + 1)) if start is None
              else torch.cat([start[0].double().reshape(-1), start[1].double()]).numpy())
    theta = torch.from_numpy(_lbfgs(objective, theta0, max_iter, tolerance, x.shape[0] * d * c))
    return theta[:c * d].view(c, d).clone(), theta[c * d:].clone()


def select_and_fit_multilabel(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                              penalties=PENALTIES, max_iter: int = 1000) -> dict:
    """`select_and_fit` for multi-label targets (VOC2007): one binary classifier per class (`fit_binary_logistic`),
    the penalty chosen by the validation split's 11-point mAP, refit on train + val, test mAP."""
    return _select(train, val, test, penalties,
                   lambda x, t, penalty, start: fit_binary_logistic(x, t, penalty, max_iter, start=start), voc07_map)
