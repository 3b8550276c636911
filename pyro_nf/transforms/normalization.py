"""Normalisation layers: invertible batch normalization for vectors, Glow's ActNorm for images.

:class:`BatchNorm` (MAF paper, RealNVP paper).

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

:class:`ActNorm` (Glow): a per-channel affine map of images with a data-dependent
initialisation, a bijection per sample in both modes.

Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import constraints

from pyro_nf.checks import check_image_shape, check_positive_int
from pyro_nf.core import FlowTransformModule

__all__ = [
    "batch_norm",
    "actnorm",
    "BatchNorm",
    "ActNorm",
]


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
        check_positive_int(input_dim, "input_dim")
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

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        var = self.running_var
        y = (x - self.beta) * (-self.log_gamma).exp() * (var + self.eps).sqrt() + self.running_mean
        return y, self._log_det(var).expand(x.shape[:-1])

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
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


class ActNorm(FlowTransformModule):
    """Per-channel (images) or per-feature (vectors) affine map with data-dependent initialisation.

    Glow's activation normalisation, for images ``(C, H, W)`` (one ``b_c, s_c`` per channel)
    and for vectors ``(D,)`` (one per feature). Forward (base to data): ``y = x exp(s) + b``,
    so ``log|det| = H W sum_c s_c`` for images and ``sum_i s_i`` for vectors. The first time
    the inverse (data to noise) runs in training mode on a module that is not yet
    initialised, ``b`` and ``s`` are set from that batch so that its output has zero mean
    and unit variance per channel (over every batch and spatial position): ``b`` is the
    mean and ``s`` the log of the standard deviation, or 0 where the standard deviation is
    below ``eps`` (a constant channel is only centred, never divided by zero). The
    statistics are computed in float64. A batch of vectors with fewer than two samples
    (an SVI guide's single latent draw) is not used: the layer stays the identity until a
    real batch comes. The ``initialised`` flag is a buffer, so a model loaded from a
    ``state_dict`` is not initialised again. Evaluation mode and the forward direction never
    initialise; afterwards ``b`` and ``s`` are ordinary parameters.

    Placed first on the data side of a vector flow (the ``actnorm=True`` of :func:`maf` and
    :func:`realnvp`), it lets the flow learn at the scale it was initialised for whatever
    the units of the data: after training on ``N(0, 1) * 1e4`` the float32 round trip of
    MAF and IAF stays at the data's rounding (``docs/families/precision.md``).

    Args:
        input_shape: the image shape ``(C, H, W)``, or a vector event ``(D,)`` (or ``D``).
        eps: smallest standard deviation that is normalised.

    Example::

        >>> norm = ActNorm((2, 4, 4))
        >>> z, log_det = norm.inverse_and_log_det(3.0 + 2.0 * torch.randn(64, 2, 4, 4))
        >>> bool(norm.initialised), abs(z.mean().item()) < 1e-6, round(z.std(correction=0).item(), 4)
        (True, True, 1.0)
        >>> vector = ActNorm(3)
        >>> z, _ = vector.inverse_and_log_det(torch.tensor([1e4, 1.0, 5.0]) * torch.randn(256, 3))
        >>> [round(v, 4) for v in z.std(0, correction=0).tolist()]
        [1.0, 1.0, 1.0]
    """

    parallel = "both"
    initialised: Tensor

    def __init__(self, input_shape: int | Sequence[int], eps: float = 1e-6, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        vector = isinstance(input_shape, int) or (isinstance(input_shape, Sequence) and len(input_shape) == 1)
        if vector:
            dim = input_shape if isinstance(input_shape, int) else input_shape[0]  # type: ignore[index]
            shape: tuple[int, ...] = (check_positive_int(dim, "input_dim"),)
            parameter_shape: tuple[int, ...] = shape
        else:
            shape = check_image_shape(input_shape)
            parameter_shape = (shape[0], 1, 1)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps: expected a positive number, got {eps!r}")
        self.input_shape = shape
        self.event_dims = len(shape)
        self.domain = self.codomain = constraints.independent(constraints.real, self.event_dims)
        self.eps = float(eps)
        self.loc = nn.Parameter(torch.zeros(parameter_shape))
        self.log_scale = nn.Parameter(torch.zeros(parameter_shape))
        self.register_buffer("initialised", torch.tensor(False))
        self._checked = False  # skips reading the flag (a device sync) once it is known to be set

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._checked = False
        super()._load_from_state_dict(*args, **kwargs)

    def _statistics(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """The initial ``(b, s)`` for the batch ``y``: its mean and log standard deviation per channel (float64)."""
        channels = self.loc.shape[0]
        flat = y.detach().movedim(-self.event_dims, 0).reshape(channels, -1)
        wide = flat.double() if flat.dtype in (torch.float16, torch.bfloat16, torch.float32) else flat
        var, mean = torch.var_mean(wide, dim=1, correction=0)
        std = var.sqrt()
        log_std = torch.where(std > self.eps, std.clamp_min(self.eps).log(), torch.zeros_like(std))
        return mean.reshape(self.loc.shape), log_std.reshape(self.loc.shape)

    @torch.no_grad()
    def initialise(self, y: Tensor) -> None:
        """Set ``b`` and ``s`` from the data-side batch ``y`` (``(..., C, H, W)`` or ``(..., D)``), mark initialised."""
        mean, log_std = self._statistics(y)
        self.loc.copy_(mean)
        self.log_scale.copy_(log_std)
        self.initialised.fill_(True)
        self._checked = True

    @torch.no_grad()
    def _initialise_unless_initialised(self, y: Tensor) -> None:
        """:meth:`initialise` if the flag is not set, without reading the flag back (for ``torch.compile``)."""
        mean, log_std = self._statistics(y)
        done = self.initialised
        self.loc.copy_(torch.where(done, self.loc, mean))
        self.log_scale.copy_(torch.where(done, self.log_scale, log_std))
        self.initialised.fill_(True)

    def initialisation_pending(self) -> bool:
        """Whether the next data-to-noise call would initialise ``b`` and ``s`` (training mode, not yet done).

        Reads the ``initialised`` flag once after a ``state_dict`` is loaded (not while compiling, where
        it answers True until the initialisation has run).
        """
        if not self.training or self._checked:
            return False
        if torch.compiler.is_compiling():
            return True
        if bool(self.initialised):
            self._checked = True
            return False
        return True

    def _log_det(self, x: Tensor) -> Tensor:
        batch = x.shape[: x.dim() - self.event_dims]
        per_channel = x.shape[-2] * x.shape[-1] if self.event_dims == 3 else 1
        return (per_channel * self.log_scale.sum()).expand(batch)

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.log_scale.exp() + self.loc, self._log_det(x)

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self._checked:
            enough = self.event_dims == 3 or y.numel() >= 2 * y.shape[-1]
            if not torch.compiler.is_compiling():
                if enough and not bool(self.initialised):
                    self.initialise(y)
                self._checked = enough or bool(self.initialised)
            elif enough:  # reading the flag would break the graph: initialise only where it is not set
                self._initialise_unless_initialised(y)
                self._checked = True
        return (y - self.loc) * (-self.log_scale).exp(), self._log_det(y)


def actnorm(input_shape: int | Sequence[int], eps: float = 1e-6) -> ActNorm:
    """An :class:`ActNorm` over images of shape ``input_shape`` ``(C, H, W)``, or vectors of size ``D``.

    Example::

        >>> actnorm(4).log_scale.shape, actnorm((3, 8, 8)).log_scale.shape
        (torch.Size([4]), torch.Size([3, 1, 1]))
    """
    return ActNorm(input_shape, eps)
