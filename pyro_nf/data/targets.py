"""Known-density targets: fixed random Gaussian mixtures whose ``log_prob`` is exact.

A flow ``q`` fitted to samples of a target ``p`` is scored by the KL divergence
from data to model,

.. math::

    \\mathrm{KL}(p \\,\\|\\, q) = \\mathbb{E}_{x \\sim p}[\\log p(x) - \\log q(x)]
    \\approx \\frac{1}{N} \\sum_{n=1}^N \\log p(x_n) - \\log q(x_n),

i.e. the test NLL minus the (estimated) true entropy. Using the same test points
for both terms makes the estimate unbiased and of much lower variance than
subtracting a separately estimated entropy. The mixture stands in for the UCI
density-estimation suite (POWER, GAS, HEPMASS, MINIBOONE, BSDS300 have
dimensions 6, 8, 21, 43 and 63), which cannot be had offline.

The mixture is drawn once from ``seed``: ``K`` equally likely components with
means uniform in ``[-spread, spread]^D`` and full covariances
``L L^T`` where ``L = Q diag(s)`` for a random rotation ``Q`` and scales ``s``
log-uniform in ``[0.3, 1]``, so components are anisotropic and tilted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["GaussianMixtureTarget", "gaussian_mixture_target"]

_F64 = torch.float64


class GaussianMixtureTarget:
    """A Gaussian mixture with exact ``log_prob`` and seeded sampling.

    ``p(x) = sum_k w_k N(x; mu_k, L_k L_k^T)``. Parameters are kept in float64;
    ``log_prob`` computes in float64 and returns the input's dtype.

    Args:
        weights: mixture weights, shape ``(K,)``, positive, summing to 1.
        means: component means, shape ``(K, D)``.
        scale_trils: lower-triangular Cholesky factors of the covariances, shape ``(K, D, D)``.

    Example::

        >>> target = gaussian_mixture_target(3, num_components=2)
        >>> x = target.sample(5, generator=torch.Generator().manual_seed(1))
        >>> target.log_prob(x).shape
        torch.Size([5])
    """

    def __init__(self, weights: Tensor, means: Tensor, scale_trils: Tensor) -> None:
        if means.dim() != 2:
            raise ValueError(f"means: expected shape (K, D), got {tuple(means.shape)}")
        k, d = means.shape
        if weights.shape != (k,):
            raise ValueError(f"weights: expected shape ({k},), got {tuple(weights.shape)}")
        if scale_trils.shape != (k, d, d):
            raise ValueError(f"scale_trils: expected shape ({k}, {d}, {d}), got {tuple(scale_trils.shape)}")
        if not bool((weights > 0).all()) or not math.isclose(float(weights.sum()), 1.0, rel_tol=1e-9):
            raise ValueError(f"weights: expected positive weights summing to 1, got {weights.tolist()}")
        self.weights = weights.to(_F64)
        self.means = means.to(_F64)
        self.scale_trils = scale_trils.to(_F64)
        self._components = torch.distributions.MultivariateNormal(self.means, scale_tril=self.scale_trils)

    @property
    def dim(self) -> int:
        """The event size D."""
        return int(self.means.shape[1])

    @property
    def num_components(self) -> int:
        """The number of mixture components K."""
        return int(self.means.shape[0])

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x)`` for ``x`` of shape ``(..., D)``; returns shape ``(...)`` in ``x``'s dtype."""
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"x: expected a floating-point tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected a tensor whose last dimension is {self.dim}, got shape {tuple(x.shape)}")
        per_component = self._components.log_prob(x.to(_F64).unsqueeze(-2))
        return torch.logsumexp(per_component + self.weights.log(), dim=-1).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw ``n`` i.i.d. points, shape ``(n, D)``; the same generator state gives the same points."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n: expected an int, got {type(n).__name__}")
        if n < 1:
            raise ValueError(f"n: expected a positive number of points, got {n}")
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, 1, generator=generator, dtype=_F64)
        x = self.means[component] + (self.scale_trils[component] @ eps).squeeze(-1)
        return x.to(dtype)

    def entropy(self, n: int = 100_000, generator: torch.Generator | None = None) -> float:
        """Monte Carlo estimate of the entropy ``-E[log p(x)]`` (no closed form for a mixture)."""
        return -float(self.log_prob(self.sample(n, generator, dtype=_F64)).mean())

    def kl_from(self, log_q: Tensor, x: Tensor) -> float:
        """``mean(log p(x) - log q(x))``: the KL(p || q) estimate from model log-densities ``log_q`` at ``x``."""
        return float((self.log_prob(x.to(_F64)) - log_q.to(_F64)).mean())


def _random_rotation(dim: int, generator: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=_F64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


def gaussian_mixture_target(
    dim: int,
    *,
    num_components: int = 8,
    spread: float = 3.0,
    seed: int = 0,
) -> GaussianMixtureTarget:
    """A fixed random Gaussian mixture in ``dim`` dimensions (the same for the same arguments).

    Args:
        dim: the event size D (at least 1).
        num_components: the number of equally weighted components K.
        spread: means are uniform in ``[-spread, spread]^D``.
        seed: the seed the mixture is drawn from.

    Example::

        >>> target = gaussian_mixture_target(8, seed=0)
        >>> target.dim, target.num_components
        (8, 8)
        >>> torch.equal(target.means, gaussian_mixture_target(8, seed=0).means)
        True
    """
    for name, value in (("dim", dim), ("num_components", num_components), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if dim < 1:
        raise ValueError(f"dim: expected a positive int, got {dim}")
    if num_components < 1:
        raise ValueError(f"num_components: expected a positive int, got {num_components}")
    if not spread >= 0:
        raise ValueError(f"spread: expected a non-negative number, got {spread!r}")
    g = torch.Generator().manual_seed(seed)
    means = (2 * torch.rand(num_components, dim, generator=g, dtype=_F64) - 1) * spread
    log_scales = math.log(0.3) * torch.rand(num_components, dim, generator=g, dtype=_F64)
    rotations = torch.stack([_random_rotation(dim, g) for _ in range(num_components)])
    covariances = rotations @ torch.diag_embed(log_scales.exp() ** 2) @ rotations.transpose(-1, -2)
    scale_trils = torch.linalg.cholesky(covariances)
    weights = torch.full((num_components,), 1.0 / num_components, dtype=_F64)
    return GaussianMixtureTarget(weights, means, scale_trils)
