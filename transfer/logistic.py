"""Kornblith et al. (2019)'s linear transfer protocol on frozen features, and the metrics its
datasets report.

The classifier is multinomial logistic regression fitted to convergence (L-BFGS, then Newton steps),
minimising

    L(W, b) = (1/N) sum_i CE(W x_i + b, y_i) + (lambda / 2) ||W||^2        (the bias is not penalised)

which is scikit-learn's LogisticRegression objective with C = 1 / (lambda N). The penalty is chosen from 45
log-spaced values in [1e-6, 1e5] by the validation split's metric, then the classifier is refitted
on train + validation with it and scored on test (`select_and_fit`), on the raw features by default
(standardize=True: standardised with the training split's mean and std, which the published protocol
does not describe).

Metrics: top-1 accuracy; mean per-class accuracy (the mean over classes of the recall of each class:
FGVC Aircraft, Oxford-IIIT Pets, Caltech-101, Oxford Flowers-102); and VOC2007's 11-point mAP for
the multi-label
VOC2007 classification set: per class, AP = (1/11) sum_{t in 0, 0.1, ..., 1} max{precision at recall >= t}, then
the mean over classes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

PENALTIES = np.logspace(-6, 5, 45)


# multiply-adds per evaluation below which one thread is faster than several
SMALL_WORK = 20_000_000
# L-BFGS-B stops at a relative decrease per step below this; Newton steps take it from there
LBFGS_FTOL = 1e-9
# each Newton step solves H s = -g by conjugate gradients to this relative residual
CG_FORCING = 1e-2


class _LinearObjective:
    """The objective of a linear model, (1/N-weighted) loss(X W^T + b) + (lambda / 2) ||W||^2, in
    float64, in the
    coordinates of standardised features: with x' = (x - mu) / sigma per feature, sigma = sqrt(variance + lambda)
    (the data's and the penalty's curvature both at most ~1, even for a constant feature), the
    logits are
    x W^T + b = x' V^T + a for V = W diag(sigma), a = b + W mu, and the penalty is
    (lambda / 2) sum_j ||V_:j||^2 / sigma_j^2. The objective is the same function, so the same
    optimum; only its conditioning for the solver changes (raw features of very different scales
    otherwise slow L-BFGS by orders of magnitude). `head(z)` gives the loss at logits z [N, C]:
    (value, dL/dz, v -> d2L/dz2 v, diag of d2L/dz2)."""

    def __init__(self, features: Tensor, classes: int, penalty: float, head):
        x = features.double()
        self.mean = x.mean(0)
        variance = x.var(0) if len(x) > 1 else torch.zeros(x.shape[1], dtype=torch.float64)
        self.scale = (variance + penalty).sqrt()
        self.x = (x - self.mean) / self.scale
        self.penalty = (penalty / self.scale.square()).expand(classes, -1)
        self.classes, self.dim, self.head = classes, x.shape[1], head
        self.work = x.shape[0] * x.shape[1] * classes
        self.curvature = None

    def split(self, theta: np.ndarray) -> tuple[Tensor, Tensor]:
        theta = torch.from_numpy(theta)
        return theta[: self.classes * self.dim].view(self.classes, self.dim), theta[
            self.classes * self.dim :
        ]

    def join(self, weight: Tensor, bias: Tensor) -> np.ndarray:
        return torch.cat([weight.reshape(-1), bias]).numpy()

    def to_standardised(self, weight: Tensor, bias: Tensor) -> np.ndarray:
        weight, bias = weight.double(), bias.double()
        return self.join(weight * self.scale, bias + weight @ self.mean)

    def from_standardised(self, theta: np.ndarray) -> tuple[Tensor, Tensor]:
        v, a = self.split(theta)
        weight = v / self.scale
        return weight.clone(), (a - weight @ self.mean).clone()

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """(value, gradient); the point is kept for `hessp` and `diagonal`."""
        v, a = self.split(theta)
        value, dz, self.curvature, self.diag_z = self.head(torch.addmm(a, self.x, v.T))
        value += 0.5 * (self.penalty * v.square()).sum().item()
        return value, self.join(dz.T @ self.x + self.penalty * v, dz.sum(0))

    def hessp(self, direction: np.ndarray) -> np.ndarray:
        """The Hessian at the last point evaluated times `direction`."""
        v, a = self.split(direction)
        hz = self.curvature(torch.addmm(a, self.x, v.T))
        return self.join(hz.T @ self.x + self.penalty * v, hz.sum(0))

    def diagonal(self) -> np.ndarray:
        """The Hessian's diagonal at the last point evaluated (a preconditioner for conjugate
        gradients)."""
        return self.join(self.diag_z.T @ self.x.square() + self.penalty, self.diag_z.sum(0))


def _conjugate_gradients(
    hessp, rhs: np.ndarray, diagonal: np.ndarray, forcing: float, max_steps: int
) -> np.ndarray:
    """An approximate solution of H s = rhs by conjugate gradients preconditioned by H's diagonal,
    from 0, until the
    residual is below `forcing` ||rhs||."""
    step, residual = np.zeros_like(rhs), rhs.copy()
    z = residual / diagonal
    direction, rz, bound = z.copy(), residual @ z, forcing * np.linalg.norm(rhs)
    for _ in range(max_steps):
        h_direction = hessp(direction)
        curvature = direction @ h_direction
        if not curvature > 0:
            break
        alpha = rz / curvature
        step += alpha * direction
        residual -= alpha * h_direction
        if np.linalg.norm(residual) <= bound:
            break
        z = residual / diagonal
        rz, previous = residual @ z, rz
        direction = z + (rz / previous) * direction
    return step


def _minimize(
    objective: _LinearObjective, theta: np.ndarray, max_iter: int, tolerance: float, project=None
) -> np.ndarray:
    """scipy's L-BFGS-B (the solver behind scikit-learn's lbfgs) for at most `max_iter` iterations
    or until its relative decrease per step is below LBFGS_FTOL, then Newton's method with exact
    Hessian-vector products (preconditioned conjugate gradients, backtracking line search) until the
    Newton decrement g^T H^-1 g / 2 -- for this smooth convex objective, the distance to the
    optimum's value up to third-order terms -- is below `tolerance` times the objective, or
    `max_iter` Newton steps.

    L-BFGS-B alone stops on its own criteria (largest gradient entry, relative decrease per step),
    which at small penalties are met far from the optimum or not within the iterations; the Newton
    steps converge quadratically from where it stops. `project` removes from a step the directions
    the objective ignores (the softmax's bias shift). A small problem runs on one thread: its
    tensors are too small to split, and on a machine whose other cores are busy every parallel
    region would wait for a descheduled thread."""
    from scipy.optimize import minimize

    threads = torch.get_num_threads()
    if objective.work < SMALL_WORK:
        torch.set_num_threads(1)
    try:
        result = minimize(
            objective,
            theta,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iter, "gtol": 1e-10, "ftol": LBFGS_FTOL, "maxcor": 20},
        )
        theta = result.x
        value, gradient = objective(theta)
        for _ in range(max_iter):
            step = _conjugate_gradients(
                objective.hessp,
                -gradient,
                np.maximum(objective.diagonal(), 1e-300),
                CG_FORCING,
                4 * len(theta),
            )
            if project is not None:
                step = project(step)
            slope = gradient @ step
            # converged (or no descent direction left in float64)
            if not -slope > 2 * tolerance * abs(value):
                break
            t = 1.0
            while t > 1e-10:
                new_value, new_gradient = objective(theta + t * step)
                if new_value <= value + 1e-4 * t * slope:
                    break
                t /= 2
            else:
                break  # no decrease: the rounding of the objective is reached
            theta, value, gradient = theta + t * step, new_value, new_gradient
    finally:
        torch.set_num_threads(threads)
    return theta


def fit_logistic(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    penalty: float,
    max_iter: int = 1000,
    tolerance: float = 1e-12,
    start: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """(W [C, D], b [C]) minimising the objective above in float64 (`_minimize`: L-BFGS, then Newton
    steps until the estimated distance to the optimal value is below `tolerance` relative), with its
    exact gradient

        dL/dW = (P - Y)^T X / N + lambda W,    dL/db = sum_i (p_i - y_i) / N

    and Hessian-vector products (P the softmax probabilities, Y the one-hot labels); from `start`
    (warm start) or from zero. The biases' sum is the start's (0 from zero): the softmax ignores a
    shift shared by all classes."""
    y = labels.long()
    n = len(y)
    onehot = F.one_hot(y, num_classes).double()

    def head(z: Tensor):
        log_p = z.log_softmax(1)
        p = log_p.exp()

        def curvature(dz: Tensor) -> Tensor:
            return p * (dz - (p * dz).sum(1, keepdim=True)) / n

        return -(log_p * onehot).sum().item() / n, (p - onehot) / n, curvature, p * (1 - p) / n

    objective = _LinearObjective(features, num_classes, penalty, head)
    if start is None:
        start = (
            torch.zeros(num_classes, features.shape[1], dtype=torch.float64),
            torch.zeros(num_classes, dtype=torch.float64),
        )
    d = objective.classes * objective.dim

    # no shift of all biases: the objective is flat along it
    def project(step: np.ndarray) -> np.ndarray:
        step[d:] -= step[d:].mean()
        return step

    theta = _minimize(objective, objective.to_standardised(*start), max_iter, tolerance, project)
    weight, bias = objective.from_standardised(theta)
    return weight, bias + (start[1].double().sum() - bias.sum()) / num_classes


def top1(scores: Tensor, labels: Tensor) -> float:
    return 100.0 * (scores.argmax(1) == labels).double().mean().item()


def mean_per_class_accuracy(scores: Tensor, labels: Tensor) -> float:
    """The mean over the classes present in `labels` of the share of their samples predicted
    right, in %."""
    predicted = scores.argmax(1)
    recalls = [(predicted[labels == c] == c).double().mean().item() for c in labels.unique()]
    return 100.0 * float(np.mean(recalls))


def eleven_point_ap(scores: np.ndarray, positives: np.ndarray) -> float:
    """VOC2007's AP of one class: ranks by score; the mean over t = 0, 0.1, ..., 1 of the best
    precision at a
    recall of at least t (0 where none reaches t)."""
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(float)
    true_positives = np.cumsum(hits)
    precision = true_positives / np.arange(1, len(hits) + 1)
    recall = true_positives / max(hits.sum(), 1)
    return float(
        np.mean(
            [
                precision[recall >= t].max() if (recall >= t).any() else 0.0
                for t in np.linspace(0, 1, 11)
            ]
        )
    )


def voc07_map(scores: Tensor, targets: Tensor) -> float:
    """The mean over classes of `eleven_point_ap`, in %. targets [N, C] as VOC's classification
    labels: 1 present,
    -1 absent, 0 'difficult' (that image left out of that class's ranking)."""
    s, t = scores.double().numpy(), targets.numpy()
    return 100.0 * float(
        np.mean(
            [eleven_point_ap(s[t[:, c] != 0, c], t[t[:, c] != 0, c] > 0) for c in range(t.shape[1])]
        )
    )


def select_and_fit(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    metric=top1,
    penalties=PENALTIES,
    max_iter: int = 1000,
    standardize: bool = False,
) -> dict:
    """Choose the penalty on val by `metric` (the smallest among ties), refit on train + val, score
    test.

    standardize: False (the published protocol: Kornblith et al. 2019 and SimCLR's appendix B.8 fit
    the raw features) or True (every split standardised with the training split's per-feature mean
    and std first; the penalty then acts on the standardised weights, so the chosen penalty and the
    result can differ). The solver converges either way: it works internally in standardised
    coordinates of the same objective.

    The penalties are fitted along the regularisation path, from the largest down, each fit starting
    from the previous one's solution. The objective is strictly convex in W and in b up to a shift
    shared by all classes, which the softmax ignores (the fit keeps the biases' sum where it
    starts): the start changes the path to the optimum, not the predictions there. The result:
    {"penalty", "validation": {penalty: metric}, "test", "standardize"}."""
    return _select(
        train,
        val,
        test,
        penalties,
        lambda x, y, penalty, start: fit_logistic(
            x, y, num_classes, penalty, max_iter, start=start
        ),
        metric,
        standardize=standardize,
    )


def _select(train, val, test, penalties, fit, metric, standardize: bool = False) -> dict:
    """The sweep of `select_and_fit`; standardize: features scaled by the training split's mean
    and std first."""
    if standardize:
        mean, std = train[0].double().mean(0), train[0].double().std(0) + 1e-8
    else:
        mean, std = 0.0, 1.0
    train_x, val_x, test_x = ((x.double() - mean) / std for x in (train[0], val[0], test[0]))
    on_val, start = {}, None
    for penalty in sorted((float(p) for p in penalties), reverse=True):
        start = fit(train_x, train[1], penalty, start)
        on_val[penalty] = metric(val_x @ start[0].T + start[1], val[1])
    best = max(on_val, key=lambda p: (on_val[p], -p))
    weight, bias = fit(torch.cat([train_x, val_x]), torch.cat([train[1], val[1]]), best, None)
    return {
        "penalty": best,
        "validation": dict(sorted(on_val.items())),
        "test": metric(test_x @ weight.T + bias, test[1]),
        "standardize": standardize,
    }


def fit_binary_logistic(
    features: Tensor,
    targets: Tensor,
    penalty: float,
    max_iter: int = 1000,
    tolerance: float = 1e-12,
    start: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One binary logistic regression per class, for multi-label targets [N, C] in VOC's convention
    (1 present,
    -1 absent, 0 'difficult': left out of that class's loss). Class c minimises

        L_c(w_c, b_c) = (1/N_c) sum_{i: t_ic != 0} BCE(w_c . x_i + b_c, [t_ic > 0]) + (lambda / 2) ||w_c||^2

    (N_c: the entries counted), i.e. scikit-learn's LogisticRegression on that class with C = 1 / (lambda N_c). The
    objectives are independent, so their sum is minimised jointly by one `_minimize` run, in
    float64, with the gradient
    dL_c/dw_c = sum_i m_ic (sigmoid(z_ic) - y_ic) x_i / N_c + lambda w_c (m_ic: entry counted)."""
    known = (targets != 0).double()
    positive = (targets > 0).double()
    counts = known.sum(0).clamp(min=1)

    def head(z: Tensor):
        losses = F.binary_cross_entropy_with_logits(z, positive, reduction="none") * known
        s = torch.sigmoid(z)
        weight = s * (1 - s) * known / counts
        return (
            (losses.sum(0) / counts).sum().item(),
            (s - positive) * known / counts,
            lambda dz: weight * dz,
            weight,
        )

    objective = _LinearObjective(features, targets.shape[1], penalty, head)
    if start is None:
        start = (
            torch.zeros(targets.shape[1], features.shape[1], dtype=torch.float64),
            torch.zeros(targets.shape[1], dtype=torch.float64),
        )
    return objective.from_standardised(
        _minimize(objective, objective.to_standardised(*start), max_iter, tolerance)
    )


def select_and_fit_multilabel(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    penalties=PENALTIES,
    max_iter: int = 1000,
    standardize: bool = False,
) -> dict:
    """`select_and_fit` for multi-label targets (VOC2007): one binary classifier per class
    (`fit_binary_logistic`), the penalty chosen by the validation split's 11-point mAP, refit on
    train + val, test mAP. standardize: as in
    `select_and_fit` (False: raw features, the published protocol)."""
    return _select(
        train,
        val,
        test,
        penalties,
        lambda x, t, penalty, start: fit_binary_logistic(x, t, penalty, max_iter, start=start),
        voc07_map,
        standardize=standardize,
    )
