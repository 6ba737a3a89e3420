"""The SSL-HSIC loss against independent computations (numpy loops, mpmath, explicit matrices)."""

import math

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.hsic import (
    KERNEL_OF_DISTANCE,
    SSLHSICLoss,
    bandwidth_objective,
    gaussian_kernel,
    hsic_xx_exact,
    hsic_xx_rff,
    hsic_xy_exact,
    hsic_xy_rff,
    imq_kernel,
    label_kernel_weights,
    log_bessel_k_times_power,
    random_fourier_features,
    sample_frequencies,
)


def views(m=4, b=6, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1) for _ in range(m)]


def numpy_kernel(x, y, c, kernel):
    d2 = float(np.sum((x - y) ** 2))
    return c / math.sqrt(d2 + c * c) if kernel == "imq" else math.exp(-d2 / (2 * c * c))


# -------------------------------------------------------------------------------------------
# kernels


def test_kernels_match_their_formulas():
    x, y = views(2, 4, 3)
    for i in range(4):
        for j in range(4):
            xi, yj = x[i].numpy(), y[j].numpy()
            assert imq_kernel(x, y, 0.7)[i, j].item() == pytest.approx(
                numpy_kernel(xi, yj, 0.7, "imq"), rel=1e-12
            )
            assert gaussian_kernel(x, y, 0.7)[i, j].item() == pytest.approx(
                numpy_kernel(xi, yj, 0.7, "gaussian"), rel=1e-12
            )
    assert torch.allclose(torch.diagonal(imq_kernel(x, x, 2.0)), torch.ones(4, dtype=torch.float64))


# ------------------------------------------------------------------------------------ exact
# estimators


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("kernel", ["imq", "gaussian"])
def test_exact_estimators_against_loops(m, kernel):
    hiddens, c = views(m, 5, 3, seed=m), 0.8
    z = [h.numpy() for h in hiddens]
    b = z[0].shape[0]
    same = sum(
        numpy_kernel(z[p][i], z[q][i], c, kernel)
        for i in range(b)
        for p in range(m)
        for q in range(m)
    )
    flat = [z[p][i] for p in range(m) for i in range(b)]
    n = len(flat)
    gram = np.array([[numpy_kernel(u, v, c, kernel) for v in flat] for u in flat])
    expected_xy = same / (b * m * (m - 1)) - gram.sum() / n**2
    h = np.eye(n) - np.ones((n, n)) / n
    expected_xx = np.trace(gram @ h @ gram @ h) / n**2
    assert hsic_xy_exact(hiddens, c, kernel).item() == pytest.approx(expected_xy, rel=1e-10)
    assert hsic_xx_exact(hiddens, c, kernel).item() == pytest.approx(expected_xx, rel=1e-10)


@pytest.mark.parametrize("b", [8, 128, 4096])
def test_label_weights_are_those_of_doubly_centred_identity(b):
    h = torch.eye(b, dtype=torch.float64) - 1.0 / b
    hlh = h @ torch.eye(b, dtype=torch.float64) @ h
    w_pos, w_neg = label_kernel_weights(b)
    assert hlh[0, 0].item() == pytest.approx(w_pos, abs=1e-12)
    assert hlh[0, 1].item() == pytest.approx(w_neg, abs=1e-12)
    assert hlh[0, 0].item() - hlh[0, 1].item() == pytest.approx(1.0, abs=1e-12)


def test_hsic_xx_of_identical_features_is_zero():
    same = [torch.ones(8, 4, dtype=torch.float64) / 2] * 4
    assert hsic_xx_exact(same, 1.0).item() == pytest.approx(0, abs=1e-14)
    assert hsic_xx_rff(same, 1.0, num_features=64).item() == pytest.approx(0, abs=1e-14)


# ----------------------------------------------------------------------------- random Fourier
# features


@pytest.mark.parametrize("nu", [0, 0.5, 3.5, 63.5, 127.5])
def test_log_bessel_table_matches_mpmath(nu):
    r = torch.tensor([1e-12, 1e-4, 0.3, 2.0, 17.0, 99.99], dtype=torch.float64)
    mpmath.mp.dps = 40
    expected = [
        float(mpmath.log(mpmath.besselk(nu, mpmath.mpf(x))) + nu * mpmath.log(mpmath.mpf(x)))
        for x in r.tolist()
    ]
    assert torch.allclose(
        log_bessel_k_times_power(nu, r),
        torch.tensor(expected, dtype=torch.float64),
        rtol=1e-12,
        atol=1e-10,
    )


def kernel_error(d, c, num_features, draws, seed=0):
    """Mean |phi(x).phi(y) - k(x, y)| over points on the unit sphere (a line for d = 1) and
    several draws."""
    g = torch.Generator().manual_seed(seed)
    errors = []
    for _ in range(draws):
        x, y = torch.randn(32, d, generator=g), torch.randn(32, d, generator=g)
        if d > 1:
            x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
        w, b = sample_frequencies("imq", num_features, d, generator=g)
        approx = random_fourier_features(x, w, b, c) @ random_fourier_features(y, w, b, c).T
        errors.append((approx - imq_kernel(x, y, c)).abs().mean().item())
    return float(np.mean(errors))


@pytest.mark.parametrize("d", [1, 8, 128, 256])
@pytest.mark.parametrize("c", [0.1, 1.0, 10.0])
def test_rff_approximates_the_imq_kernel(d, c):
    error_512 = kernel_error(d, c, 512, draws=5)
    assert error_512 < 0.1
    assert kernel_error(d, c, 8192, draws=5, seed=1) < error_512


def test_gaussian_rff_approximates_the_gaussian_kernel():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    w, b = sample_frequencies("gaussian", 8192, 16, generator=g)
    approx = random_fourier_features(x, w, b, 0.5) @ random_fourier_features(x, w, b, 0.5).T
    assert (approx - gaussian_kernel(x, x, 0.5)).abs().mean() < 0.02


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("kernel", ["imq", "gaussian"])
def test_rff_estimators_are_unbiased(m, kernel):
    """Averaged over draws, the RFF estimators agree with the exact ones within 4 standard
    errors."""
    hiddens, c, draws = views(m, 12, 16, seed=3, dtype=torch.float32), 0.7, 400
    g = torch.Generator().manual_seed(0)
    xy = torch.tensor(
        [hsic_xy_rff(hiddens, c, kernel, 128, g).item() for _ in range(draws)], dtype=torch.float64
    )
    xx = torch.tensor(
        [hsic_xx_rff(hiddens, c, kernel, 128, g).item() for _ in range(draws)], dtype=torch.float64
    )
    for samples, exact in (
        (xy, hsic_xy_exact(hiddens, c, kernel)),
        (xx, hsic_xx_exact(hiddens, c, kernel)),
    ):
        standard_error = samples.std().item() / math.sqrt(draws)
        assert abs(samples.mean().item() - exact.item()) < 4 * standard_error, (
            samples.mean(),
            exact,
            standard_error,
        )


def test_seeded_draws_are_reproducible():
    a = sample_frequencies("imq", 64, 8, torch.Generator().manual_seed(5))
    b = sample_frequencies("imq", 64, 8, torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# ----------------------------------------------------------------------------------------------
# loss


@pytest.mark.parametrize("estimator", ["rff", "exact"])
@pytest.mark.parametrize("m", [2, 4])
def test_loss_combines_the_terms_and_reaches_every_view(estimator, m):
    loss_fn = SSLHSICLoss(num_features=256, estimator=estimator)
    hiddens = [h.float().requires_grad_(True) for h in views(m, 16, 8, seed=1)]
    loss, stats = loss_fn(hiddens, [torch.Generator().manual_seed(0)])
    assert loss.item() == pytest.approx(
        3.0 * math.sqrt(stats["hsic_xx"]) - stats["hsic_xy"], rel=1e-5
    )
    assert stats["scale"] == 1.0
    loss.backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in hiddens)
    assert loss_fn.scale.grad is None  # the HSIC terms see the bandwidth detached


def test_exact_loss_equals_formula_on_normalised_views():
    hiddens = [h * 3 for h in views(4, 6, 5)]  # the loss L2-normalises its inputs
    loss, _ = SSLHSICLoss(estimator="exact", gamma=2.0, init_scale=0.5)(hiddens)
    normalised = [F.normalize(h, dim=1).float() for h in hiddens]
    expected = 2.0 * hsic_xx_exact(normalised, 0.5).sqrt() - hsic_xy_exact(normalised, 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_runs_in_float32_under_autocast():
    loss_fn = SSLHSICLoss(num_features=128)
    hiddens = [h.to(torch.bfloat16) for h in views(4, 8, 16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = loss_fn(hiddens, [torch.Generator().manual_seed(0)])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_bad_inputs_are_refused():
    loss_fn = SSLHSICLoss()
    with pytest.raises(ValueError, match="at least 2 views"):
        loss_fn([torch.randn(4, 8)])
    with pytest.raises(ValueError, match="same shape"):
        loss_fn([torch.randn(4, 8), torch.randn(4, 9)])
    with pytest.raises(ValueError, match="NaN or inf"):
        loss_fn([torch.randn(4, 8), torch.full((4, 8), float("nan"))])
    with pytest.raises(ValueError, match="at least 2 images"):
        loss_fn([torch.randn(1, 8), torch.randn(1, 8)])
    with pytest.raises(ValueError, match="unknown kernel"):
        SSLHSICLoss(kernel="laplace")
    with pytest.raises(ValueError, match="unknown estimator"):
        SSLHSICLoss(estimator="nystrom")


# -----------------------------------------------------------------------------------------
# bandwidth


def stationary_scale(dist2: np.ndarray) -> float:
    """Root of d/dc mean_j [2 log c - 3 log(d_j^2 + c^2)] = 2/c - mean_j 6c / (d_j^2 + c^2)
    (IMQ), by bisection."""
    lo, hi = 1e-4, 1e2

    def f(c):
        return 2 / c - np.mean(6 * c / (dist2 + c * c))

    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return lo


@pytest.mark.parametrize("kernel", ["imq", "gaussian"])
def test_bandwidth_optimum_of_one_pair_is_half_the_squared_distance(kernel):
    dist2 = torch.tensor([0.72])
    scale = torch.tensor(1.5, requires_grad=True)
    optimizer = torch.optim.Adam([scale], lr=0.02)
    for _ in range(1500):
        optimizer.zero_grad()
        bandwidth_objective(dist2, scale, kernel).backward()
        optimizer.step()
    assert scale.item() ** 2 == pytest.approx(0.36, rel=1e-3)


def test_bandwidth_loss_drives_the_scale_to_its_stationary_point():
    hiddens = views(4, 64, 16, seed=7, dtype=torch.float32)
    loss_fn = SSLHSICLoss(init_scale=2.0, bandwidth_pairs=256)
    optimizer = torch.optim.Adam([loss_fn.scale], lr=0.01)
    for _ in range(1500):  # the same pairs every step: a deterministic objective
        optimizer.zero_grad()
        loss_fn.bandwidth_loss(hiddens, [torch.Generator().manual_seed(0)]).backward()
        optimizer.step()
    # Rebuild the sampled pairs independently: bandwidth_pairs / M rows of each view per side, same
    # seed.
    g, rows = torch.Generator().manual_seed(0), 256 // 4
    sides = [
        torch.cat([h[torch.randint(64, (rows,), generator=g)] for h in hiddens]) for _ in range(2)
    ]
    dist2 = torch.cdist(sides[0].double(), sides[1].double()).square().numpy()
    assert loss_fn.scale.item() == pytest.approx(stationary_scale(dist2), rel=1e-3)


def test_bandwidth_loss_trains_only_the_scale():
    hiddens = [h.float().requires_grad_(True) for h in views(4, 8, 8)]
    loss_fn = SSLHSICLoss()
    loss_fn.bandwidth_loss(hiddens).backward()
    assert loss_fn.scale.grad is not None and loss_fn.scale.grad.abs() > 0
    assert all(h.grad is None for h in hiddens)


@pytest.mark.parametrize("kernel", ["imq", "gaussian"])
def test_closed_form_bandwidth_objective_equals_the_autograd_derivative(kernel):
    """The slope is dk / d(dist^2) at fixed distances, as the official code takes it with
    autograd."""

    dist2 = torch.rand(50, dtype=torch.float64) * 3
    scale = torch.tensor(0.8, dtype=torch.float64)
    d = dist2.clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(KERNEL_OF_DISTANCE[kernel](d, scale).sum(), d)
    expected = -0.5 * torch.log(slope.square().clamp_min(1e-14)).mean()
    assert bandwidth_objective(dist2, scale, kernel).item() == pytest.approx(
        expected.item(), rel=1e-12
    )
