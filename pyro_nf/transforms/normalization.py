"""Batch normalization as an invertible layer (MAF paper, RealNVP paper).

In the data-to-noise direction (the inverse, in Pyro's convention) a batch is
standardized and rescaled, ``z = (x - m) / sqrt(v + eps) * exp(gamma) + beta``,
with the batch mean and (biased) variance over every batch dimension while
training and the running averages in evaluation mode. The forward direction
(sampling) always uses the running averages. ``log|det dx/dz| =
sum(-gamma + 0.5 log(v + eps))``.

Pyro's own ``BatchNorm`` is element-wise (event dim 0), reads the statistics
from the first batch dimension only and computes the variance twice (once in
``_inverse``, once in ``log_abs_det_jacobian``); this one is one pass over a
vector event and works with any batch shape.

Because training-mode statistics depend on the whole batch, a flow with batch
norm is an exact bijection per sample only in evaluation mode (``.eval()``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyro_nf.core import FlowTransformModule


class BatchNorm(FlowTransformModule):
    """Invertible batch normalization over a vector event of size ``input_dim``.

    Example::

        >>> bn = BatchNorm(3)
        >>> z, log_det = bn.inverse_and_log_det(torch.randn(100, 3))
        >>> bool(z.mean(0).abs().max() < 1e-5)
        True
    """

    parallel = "both"

    def __init__(self, input_dim: int, momentum: float = 0.1, eps: float = 1e-5, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum: expected a number in (0, 1], got {momentum!r}")
        self.input_shape = (input_dim,)
        self.momentum = momentum
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(input_dim))
        self.beta = nn.Parameter(torch.zeros(input_dim))
        self.register_buffer("running_mean", torch.zeros(input_dim))
        self.register_buffer("running_var", torch.ones(input_dim))

    def _log_det(self, var: Tensor) -> Tensor:
        return (0.5 * (var + self.eps).log() - self.log_gamma).sum(-1)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        var = self.running_var
        y = (x - self.beta) * (-self.log_gamma).exp() * (var + self.eps).sqrt() + self.running_mean
        return y, self._log_det(var).expand(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            flat = y.reshape(-1, y.shape[-1])
            mean, var = flat.mean(0), flat.var(0, correction=0)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        x = (y - mean) * (var + self.eps).rsqrt() * self.log_gamma.exp() + self.beta
        return x, self._log_det(var).expand(y.shape[:-1])


def batch_norm(input_dim: int, momentum: float = 0.1, eps: float = 1e-5) -> BatchNorm:
    """A :class:`BatchNorm` layer over a vector of size ``input_dim``."""
    return BatchNorm(input_dim, momentum=momentum, eps=eps)
