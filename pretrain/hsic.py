"""The SSL-HSIC loss (Li, Pogodin, Sutherland, Gretton, NeurIPS 2021, arXiv 2106.08320).

Each of B images gives M feature vectors z_i^p (the views). With a kernel k on features and the
identity kernel on image labels, the loss is

    loss = gamma * sqrt(HSIC(Z, Z)) - HSIC(Z, Y)

HSIC(Z, Y) rewards views of one image for being close in kernel space relative to all pairs; HSIC(Z,
Z) keeps the features from collapsing onto a few directions. Both come in two estimators:

* exact (Gram matrix over all N = B*M features, O(N^2)), the reference for small batches, and
* random Fourier features (RFF, O(N*D)): k(x, y) ~= phi(x) . phi(y), phi(x) = sqrt(2/D) cos(x/c @
  w.T + b), which is what the official JAX code (deepmind/ssl_hsic, kernels.py) trains with.

Where the paper and the official code differ, this follows the code. Two deliberate departures from
it: the RFF phases b are drawn independently of the directions (the code derives both from one key,
which biases HSIC_xx by about 1%), and the radial law of the IMQ frequencies is tabulated with a
log-space Bessel recurrence instead of mpmath (same values, checked in tests, milliseconds instead
of a minute) and sampled as a piecewise-constant density rather than on the grid's points (see
`imq_radial_table`)."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from common.seeds import derive_seed

KERNELS = ("imq", "gaussian")
ESTIMATORS = ("rff", "exact")

# ---------------------------------------------------------------------------------------------
# kernels


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """||x_i - y_j||^2 for all pairs, [n, d] x [m, d] -> [n, m], clamped at 0 against round-off."""
    return (x.square().sum(1, keepdim=True) + y.square().sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)


def imq_from_squared_distance(dist2: Tensor, c: Tensor | float) -> Tensor:
    """Inverse multiquadric k_c = c / sqrt(dist^2 + c^2), so that k(x, x) = 1."""
    return c / torch.sqrt(dist2 + c * c)


def gaussian_from_squared_distance(dist2: Tensor, sigma: Tensor | float) -> Tensor:
    """Gaussian k_sigma = exp(-dist^2 / (2 sigma^2))."""
    return torch.exp(-dist2 / (2 * sigma * sigma))


KERNEL_OF_DISTANCE: dict[str, Callable[[Tensor, Tensor | float], Tensor]] = {
    "imq": imq_from_squared_distance,
    "gaussian": gaussian_from_squared_distance,
}


def imq_kernel(x: Tensor, y: Tensor, c: Tensor | float) -> Tensor:
    """Gram matrix of the inverse multiquadric kernel, c / sqrt(||x - y||^2 + c^2)."""
    return imq_from_squared_distance(squared_distances(x, y), c)


def gaussian_kernel(x: Tensor, y: Tensor, sigma: Tensor | float) -> Tensor:
    """Gram matrix of the Gaussian kernel, exp(-||x - y||^2 / (2 sigma^2))."""
    return gaussian_from_squared_distance(squared_distances(x, y), sigma)


def label_kernel_weights(batch_size: int) -> tuple[float, float]:
    """(w_pos, w_neg): the entries of H L H for the identity label kernel L = I_B, H = I - 11^T/B.

    The label kernel is centred twice, as in the official code; w_pos sits on the diagonal (same
    image),
    w_neg off it. w_pos - w_neg = 1 for every B, which is the factor `dl` of HSIC_xy.
    """
    w_pos, w_neg = 1.0, 0.0
    for _ in range(2):
        mean = (w_pos + w_neg * (batch_size - 1)) / batch_size
        w_pos, w_neg = w_pos - mean, w_neg - mean
    return w_pos, w_neg


# ---------------------------------------------------------------------------------- exact
# estimators


class NonFiniteFeatures(ValueError):
    """The features given to the loss hold NaN or inf."""


def _validate(hiddens: Sequence[Tensor]) -> None:
    if not isinstance(hiddens, (list, tuple)) or len(hiddens) < 2:
        raise ValueError(
            f"SSL-HSIC needs a list of at least 2 views (tensors [B, d]), got "
            f"{len(hiddens) if isinstance(hiddens, (list, tuple)) else type(hiddens).__name__}"
        )
    shapes = {tuple(h.shape) for h in hiddens}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"every view must be a [B, d] tensor of the same shape, got shapes {sorted(shapes)}"
        )
    if hiddens[0].shape[0] < 2:
        raise ValueError(
            f"SSL-HSIC needs a batch of at least 2 images, got B = {hiddens[0].shape[0]}"
        )
    if not all(torch.isfinite(h).all() for h in hiddens):
        raise NonFiniteFeatures(
            "the features contain NaN or inf; the network diverged upstream of the loss"
        )


def _gram(hiddens: Sequence[Tensor], c: Tensor | float, kernel: str) -> Tensor:
    z = torch.cat(list(hiddens))  # row p*B + i holds z_i^p
    return KERNEL_OF_DISTANCE[kernel](squared_distances(z, z), c)


def hsic_xy_exact(hiddens: Sequence[Tensor], c: Tensor | float, kernel: str = "imq") -> Tensor:
    """HSIC(Z, Y) = dl * ( sum_i sum_{p,q} k(z_i^p, z_i^q) / (B M (M-1)) - sum_{all pairs} k / (B
    M)^2 )."""
    _validate(hiddens)
    m, b = len(hiddens), hiddens[0].shape[0]
    gram = _gram(hiddens, c, kernel).view(m, b, m, b)
    same_image = torch.diagonal(gram, dim1=1, dim2=3).sum()  # sum over i, p, q of k(z_i^p, z_i^q)
    w_pos, w_neg = label_kernel_weights(b)
    return (w_pos - w_neg) * (same_image / (b * m * (m - 1)) - gram.sum() / (b * m) ** 2)


def hsic_xx_exact(hiddens: Sequence[Tensor], c: Tensor | float, kernel: str = "imq") -> Tensor:
    """HSIC(Z, Z) = tr(K H K H) / N^2 = ||H K H||_F^2 / N^2, N = B M, H = I - 11^T / N."""
    _validate(hiddens)
    gram = _gram(hiddens, c, kernel)
    centred = gram - gram.mean(0, keepdim=True)
    centred = centred - centred.mean(1, keepdim=True)
    return centred.square().sum() / gram.shape[0] ** 2


# ------------------------------------------------------------------------------ random Fourier
# features

RADIAL_GRID = (1e-12, 100.0, 10_000)  # the official code's grid for the IMQ radial law


def log_bessel_k_times_power(nu: float, r: Tensor) -> Tensor:
    """log(K_nu(r) * r^nu) for nu in {0, 1/2, 1, 3/2, ...} and r > 0, in float64, without overflow.

    K_nu(r) alone overflows float64 for large nu at small r (nu = 127.5 at r = 1e-12 is ~1e1570). Start from
    K_0, K_1 (integer nu) or K_{1/2}, K_{3/2} (half-integer nu) and climb with the forward
    recurrence
    K_{n+1} = K_{n-1} + (2n / r) K_n, which is stable for K, carried as the ratio rho_n = K_{n+1} / K_n.
    """
    r = r.double()
    if abs(2 * nu - round(2 * nu)) > 1e-9 or nu < 0:
        raise ValueError(f"nu must be a non-negative multiple of 1/2, got {nu}")
    # half-integer: K_{1/2}(r) = sqrt(pi / (2r)) e^-r, K_{3/2} = K_{1/2} (1 + 1/r)
    if round(2 * nu) % 2 == 1:
        n, log_k, rho = 0.5, 0.5 * torch.log(math.pi / (2 * r)) - r, 1 + 1 / r
    else:
        k0, k1 = (
            torch.special.scaled_modified_bessel_k0(r),
            torch.special.scaled_modified_bessel_k1(r),
        )
        n, log_k, rho = 0.0, torch.log(k0) - r, k1 / k0
    while n < nu - 1e-9:
        log_k = log_k + torch.log(rho)
        n += 1
        rho = 1 / rho + 2 * n / r
    return log_k + nu * torch.log(r)


@functools.lru_cache(maxsize=None)
def imq_radial_table(dim: int) -> tuple[Tensor, Tensor]:
    """(bin edges [G], bin probabilities [G-1]) of r = ||w|| for the IMQ kernel's spectral law in
    `dim` dims.

    The IMQ kernel 1/sqrt(1 + ||u||^2) has spectral density p(w) ~ K_nu(||w||) ||w||^-nu, nu = (dim-1)/2, so
    r has density ~ r^(dim-1) p(r) = K_nu(r) r^nu. The density is evaluated at the midpoints of the official
    grid's bins and r is drawn uniformly inside the chosen bin. (The official code draws the grid
    points
    themselves; for dim = 1 the log-singular density at its first point, 1e-12, then puts 15% of the mass
    there instead of 4%, which biases the kernel estimate by ~0.1.)
    """
    edges = torch.linspace(*RADIAL_GRID, dtype=torch.float64)
    log_density = log_bessel_k_times_power((dim - 1) / 2, (edges[1:] + edges[:-1]) / 2)
    return edges.float(), torch.softmax(log_density, 0).float()


def sample_frequencies(
    kernel: str,
    num_features: int,
    dim: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw RFF frequencies w [D, dim] and phases b [D] for a kernel of unit bandwidth (on the CPU).

    IMQ: w = r u, u uniform on the sphere, r from `imq_radial_table`'s law. Gaussian: w ~ N(0, I). b ~ U[0, 2 pi),
    drawn independently of w.
    """
    direction = torch.randn(num_features, dim, generator=generator)
    if kernel == "imq":
        edges, probabilities = imq_radial_table(dim)
        bins = torch.multinomial(probabilities, num_features, replacement=True, generator=generator)
        radius = edges[bins] + (edges[bins + 1] - edges[bins]) * torch.rand(
            num_features, generator=generator
        )
        frequencies = radius[:, None] * direction / direction.norm(dim=1, keepdim=True)
    elif kernel == "gaussian":
        frequencies = direction
    else:
        raise ValueError(f"unknown kernel '{kernel}'; choose one of {KERNELS}")
    phases = 2 * math.pi * torch.rand(num_features, generator=generator)
    return frequencies, phases


def random_fourier_features(
    x: Tensor, frequencies: Tensor, phases: Tensor, scale: Tensor | float
) -> Tensor:
    """phi(x) = sqrt(2/D) cos((x / c) @ w.T + b), so that E[phi(x) . phi(y)] = k_c(x, y)."""
    projection = (x / scale) @ frequencies.T + phases
    return math.sqrt(2.0 / frequencies.shape[0]) * torch.cos(projection)


def _features(
    hiddens: Sequence[Tensor],
    kernel: str,
    num_features: int,
    scale: Tensor | float,
    generator: torch.Generator | None,
) -> Tensor:
    """phi of every view under one fresh draw: [M, B, D]."""
    w, b = sample_frequencies(kernel, num_features, hiddens[0].shape[1], generator)
    z = torch.stack(list(hiddens))
    return random_fourier_features(z, w.to(z), b.to(z), scale)


def hsic_xy_rff(
    hiddens: Sequence[Tensor],
    scale: Tensor | float,
    kernel: str = "imq",
    num_features: int = 512,
    generator: torch.Generator | None = None,
) -> Tensor:
    """HSIC(Z, Y) = dl * ( sum_i ||S_i||^2 / (B M (M-1)) - ||T||^2 / (B M)^2 ), S_i = sum_p
    phi(z_i^p), T = sum_i S_i."""
    m, b = len(hiddens), hiddens[0].shape[0]
    per_image = _features(hiddens, kernel, num_features, scale, generator).sum(0)  # S: [B, D]
    w_pos, w_neg = label_kernel_weights(b)
    return (w_pos - w_neg) * (
        per_image.square().sum() / (b * m * (m - 1))
        - per_image.sum(0).square().sum() / (b * m) ** 2
    )


def hsic_xx_rff(
    hiddens: Sequence[Tensor],
    scale: Tensor | float,
    kernel: str = "imq",
    num_features: int = 512,
    generator: torch.Generator | None = None,
) -> Tensor:
    """HSIC(Z, Z) = || (Phi1 - mu1)^T (Phi2 - mu2) ||_F^2 / N^2, with two independent RFF draws
    over all N rows."""
    n = len(hiddens) * hiddens[0].shape[0]
    phi1 = _features(hiddens, kernel, num_features, scale, generator).reshape(n, num_features)
    phi2 = _features(hiddens, kernel, num_features, scale, generator).reshape(n, num_features)
    cross = (phi1 - phi1.mean(0)).T @ (phi2 - phi2.mean(0))
    return cross.square().sum() / n**2


# ----------------------------------------------------------------------------------------------
# loss


def draw_seed(seed: int, step: int, draw: int) -> int:
    """The seed of one random draw (features and bandwidth pairs): a function of (run seed, step,
    draw index).

    Draw index = rank * draws_per_process + k, so that W processes with one draw each use the same draws as
    one process with W draws."""
    return derive_seed(seed, "pretrain.kernel_draws", step, draw)


def draw_generators(seed: int, step: int, first: int, count: int) -> list[torch.Generator]:
    """CPU generators for draws first .. first + count - 1 of a step."""
    return [torch.Generator().manual_seed(draw_seed(seed, step, first + k)) for k in range(count)]


class SSLHSICLoss(nn.Module):
    """loss = gamma * sqrt(HSIC(Z, Z)) - HSIC(Z, Y), over M views of B images, plus the bandwidth's
    objective.

    forward(hiddens, generators) takes M tensors [B, d] (for the with-target variant: online predictions of
    views 1 and 2, then target projections of views 2 and 1), L2-normalises them, and returns (loss,
    stats). With the RFF estimator each generator gives one independent draw of the random features
    and the loss is the mean over draws,

        loss = (1/K) sum_k [gamma * sqrt(HSIC_xx^(k)) - HSIC_xy^(k)],

    which is what K devices of the official code average between them (each draws its own features
    for the all-gathered batch, and the gradients are averaged). The HSIC terms see the kernel
    bandwidth `scale` detached; `bandwidth_loss(hiddens, generators)` (the mean of the bandwidth
    objective over the same generators' pair draws) is the only thing that trains it (its own
    optimizer: Adam at 3e-4 in the paper).

    The loss runs in float32 under autocast. sqrt(HSIC_xx) is taken of max(HSIC_xx, 1e-12) so that
    identical features give a finite gradient.
    """

    def __init__(
        self,
        num_features: int = 512,
        gamma: float = 3.0,
        kernel: str = "imq",
        estimator: str = "rff",
        init_scale: float = 1.0,
        normalize: bool = True,
        bandwidth_pairs: int = 1024,
    ):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel '{kernel}'; choose one of {KERNELS}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator '{estimator}'; choose one of {ESTIMATORS}")
        if init_scale <= 0 or num_features < 1:
            raise ValueError(
                f"need init_scale > 0 and num_features >= 1, got {init_scale} and {num_features}"
            )
        self.num_features, self.gamma, self.kernel, self.estimator = (
            num_features,
            gamma,
            kernel,
            estimator,
        )
        self.normalize, self.bandwidth_pairs = normalize, bandwidth_pairs
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))

    @classmethod
    def from_config(cls, config) -> "SSLHSICLoss":
        """Built by keyword from a loss config (pretrain.schema.LossConfig): the fields that name an
        argument of the constructor (num_features, gamma, kernel, estimator, init_scale); the others
        (scale_lr, draws) are
        the trainer's."""
        names = inspect.signature(cls.__init__).parameters
        return cls(
            **{
                name: getattr(config, name)
                for name in names
                if name != "self" and hasattr(config, name)
            }
        )

    def extra_repr(self) -> str:
        return (
            f"kernel={self.kernel}, estimator={self.estimator}, num_features={self.num_features}, "
            f"gamma={self.gamma}"
        )

    def _prepare(self, hiddens: Sequence[Tensor]) -> list[Tensor]:
        _validate(hiddens)
        hiddens = [h.float() for h in hiddens]
        return [nn.functional.normalize(h, dim=1) for h in hiddens] if self.normalize else hiddens

    def hsic_terms(
        self, hiddens: Sequence[Tensor], generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(HSIC_xy, HSIC_xx) of prepared float32 views under one draw, with the bandwidth
        detached."""
        scale = self.scale.detach()
        if self.estimator == "exact":
            return hsic_xy_exact(hiddens, scale, self.kernel), hsic_xx_exact(
                hiddens, scale, self.kernel
            )
        options = dict(kernel=self.kernel, num_features=self.num_features, generator=generator)
        return hsic_xy_rff(hiddens, scale, **options), hsic_xx_rff(hiddens, scale, **options)

    def forward(
        self, hiddens: Sequence[Tensor], generators: Sequence[torch.Generator | None] = (None,)
    ) -> tuple[Tensor, dict[str, float]]:
        if len(generators) < 1:
            raise ValueError("SSL-HSIC needs at least one generator (one random draw)")
        with torch.autocast(device_type=hiddens[0].device.type, enabled=False):
            hiddens = self._prepare(hiddens)
            # the exact estimator has nothing random: one evaluation stands for every draw
            terms = [
                self.hsic_terms(hiddens, g)
                for g in (generators if self.estimator == "rff" else generators[:1])
            ]
            hsic_xy = torch.stack([xy for xy, _ in terms])
            hsic_xx = torch.stack([xx for _, xx in terms])
            loss = (self.gamma * torch.sqrt(hsic_xx.clamp_min(1e-12)) - hsic_xy).mean()
        stats = {
            "loss": loss.item(),
            "hsic_xy": hsic_xy.mean().item(),
            "hsic_xx": hsic_xx.mean().item(),
            "scale": self.scale.item(),
        }
        return loss, stats

    def bandwidth_loss(
        self, hiddens: Sequence[Tensor], generators: Sequence[torch.Generator | None] = (None,)
    ) -> Tensor:
        """The mean over generators of `bandwidth_objective` on sampled pairs: a function of the
        scale alone (the features are detached). Each side takes bandwidth_pairs / M random rows of
        every view; all pairs across
        the two sides count."""
        with torch.autocast(device_type=hiddens[0].device.type, enabled=False):
            hiddens = [h.detach() for h in self._prepare(hiddens)]
            rows = max(1, self.bandwidth_pairs // len(hiddens))
            batch = hiddens[0].shape[0]

            def side(generator) -> Tensor:
                picks = [
                    h[torch.randint(batch, (rows,), generator=generator).to(h.device)]
                    for h in hiddens
                ]
                return torch.cat(picks)

            return torch.stack(
                [
                    bandwidth_objective(
                        squared_distances(side(g), side(g)), self.scale, self.kernel
                    )
                    for g in generators
                ]
            ).mean()


def bandwidth_objective(dist2: Tensor, scale: Tensor, kernel: str = "imq") -> Tensor:
    """-mean over pairs of 0.5 log(max(1e-14, (dk / d dist^2)^2)), to be minimised over the scale c.

    The derivative is with respect to the squared distance (not the scale), at detached distances,
    in closed form (the official code differentiates with autograd; same values, no double
    backward):
        IMQ       dk/d dist^2 = -(c / 2) (dist^2 + c^2)^(-3/2)
        Gaussian  dk/d dist^2 = -exp(-dist^2 / (2 c^2)) / (2 c^2)
    Its magnitude is largest at c^2 = dist^2 / 2 for both kernels, so this tunes the bandwidth to where the
    kernel is most sensitive to the features' distances.
    """
    dist2 = dist2.detach()
    if kernel == "imq":
        log_slope = torch.log(scale / 2) - 1.5 * torch.log(dist2 + scale * scale)
    elif kernel == "gaussian":
        log_slope = -math.log(2) - 2 * torch.log(scale) - dist2 / (2 * scale * scale)
    else:
        raise ValueError(f"unknown kernel '{kernel}'; choose one of {KERNELS}")
    return -log_slope.clamp_min(0.5 * math.log(1e-14)).mean()
