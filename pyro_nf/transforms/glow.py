"""Glow: the invertible 1x1 convolution, the Glow step and the multiscale Glow model.

One Glow step, in the data-to-noise direction, is ActNorm (a per-channel
affine map), an invertible 1x1 convolution (a learned mixing of the
channels at every pixel) and an affine (or additive) coupling over the
channels. In Pyro's convention the forward map goes from noise to data, so
a :class:`GlowStep` applies the coupling first and ActNorm last.

:func:`glow` stacks ``depth`` steps per level over ``levels`` levels of
RealNVP's multiscale architecture with Glow's learned prior for the
factored-out channels, as one bijection over ``(C, H, W)``
(see :mod:`pyro_nf.transforms.multiscale`). :func:`conditional_glow` is its
class-conditional form: Glow with a prior whose mean and scale depend on a context.

Why not Pyro's ``GeneralizedChannelPermute``: it is the same LU form, but it
stores ``U`` densely, so the diagonal of ``U`` can cross zero during training
(a singular, non-invertible matrix; Glow keeps the signs fixed and learns
``log|s|``), it computes the convolution as a broadcast product that holds a
``C x C x H x W`` tensor per image (forward and backward of a batch of 64 on one
CPU thread: 15 ms against 0.9 ms here at C = 12, 14 x 14, 24 ms against 0.5 ms at
C = 48, 4 x 4; its inverse 9-27x slower), and as a plain torch ``Transform`` its
cached value goes stale across optimizer steps ("backward through the graph a
second time") and it has neither the one-pass fused methods nor the input checks
of :class:`~pyro_nf.core.FlowTransform`.

Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from pyro_nf.checks import check_image_shape, check_options, check_positive_int
from pyro_nf.conditional import ConditionalFlowStack
from pyro_nf.core import FlowStack, FlowTransformModule, fused_forward, fused_inverse
from pyro_nf.transforms.conditional_prior import ConditionalLatentAffine
from pyro_nf.transforms.elementwise import LOG_SCALE_BOUND, Scale
from pyro_nf.transforms.image_coupling import CouplingKind, image_coupling, image_map, prior_coupling
from pyro_nf.transforms.multiscale import check_squeezable, multiscale
from pyro_nf.transforms.normalization import ActNorm

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "invertible_conv1x1",
    "glow_step",
    "glow",
    "conditional_glow",
    "InvertibleConv1x1",
    "GlowStep",
    "GlowOptions",
]

_IMAGE = constraints.independent(constraints.real, 3)


def _full_precision(x: Tensor) -> contextlib.AbstractContextManager[None]:
    """A context in which autocast (mixed precision) is off on ``x``'s device, if it was on.

    The 1x1 convolution's matrices and their product with the image stay in the parameters' precision under
    ``torch.autocast``: only the coupling networks run in the lower precision.
    """
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def _mix_channels(matrix: Tensor, x: Tensor) -> Tensor:
    """``y[..., :, h, w] = matrix @ x[..., :, h, w]`` at every pixel of ``(..., C, H, W)``: a 1x1 convolution.

    One matrix product: a batched product against the matrix broadcast over the batch (no copy of it), or, for
    a ``channels_last`` batch, one product of its ``(N H W, C)`` rows (the result stays ``channels_last``).
    Either is faster than ``F.conv2d`` with a 1x1 kernel on a CPU and than ``matrix @ x.flatten(-2)``,
    which copies the image to a transposed layout (``docs/families/images.md``, the operation count).

    Example::

        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.allclose(_mix_channels(torch.eye(3), x), x)
        True
    """
    c, h, w = x.shape[-3:]
    if x.dim() == 3:
        return (matrix @ x.reshape(c, h * w)).view(c, h, w)
    if x.dim() == 4 and c > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return (x.permute(0, 2, 3, 1) @ matrix.T).permute(0, 3, 1, 2)
    flat = x.reshape(-1, c, h * w)
    return torch.bmm(matrix.expand(flat.shape[0], c, c), flat).view(x.shape)


class InvertibleConv1x1(FlowTransformModule):
    """Glow's invertible 1x1 convolution: ``y[:, h, w] = W x[:, h, w]`` at every pixel.

    ``log|det| = H W log|det W|``. With ``lu=True`` (the default)
    ``W = P L (U + diag(sign(s) exp(log|s|)))`` with a fixed permutation ``P`` and
    fixed signs (buffers) and learned strictly lower ``L`` (unit diagonal), strictly
    upper ``U`` and ``log|s|``: the log-det is ``H W sum log|s|`` and ``W`` can
    never become singular. With ``lu=False`` the matrix ``W`` is learned as it is
    and its log-determinant and inverse come from ``slogdet`` and ``inv``
    (``O(C^3)`` per call). Both start at a random rotation.

    Args:
        input_shape: the image shape ``(C, H, W)``.
        lu: the LU-decomposed form.

    Example::

        >>> conv = InvertibleConv1x1((3, 4, 4))
        >>> x = torch.randn(2, 3, 4, 4)
        >>> y, log_det = conv.forward_and_log_det(x)
        >>> torch.allclose(conv.inv(y), x, atol=1e-5), log_det.abs().max().item() < 1e-5
        (True, True)
    """

    domain = _IMAGE
    codomain = _IMAGE
    parallel = "both"

    permutation: Tensor
    permutation_t: Tensor
    sign_s: Tensor
    lower_mask: Tensor
    upper_mask: Tensor
    eye: Tensor

    def __init__(self, input_shape: Sequence[int], lu: bool = True, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        shape = check_image_shape(input_shape)
        self.input_shape = shape
        self.pixels = shape[1] * shape[2]
        self.lu = bool(lu)
        c = shape[0]
        w = torch.linalg.qr(torch.randn(c, c))[0].contiguous()  # Q comes column-major; Pyro's param store copies those
        if not self.lu:
            self.weight = nn.Parameter(w)
            return
        lu_factors, pivots = torch.linalg.lu_factor(w)
        p, lower, upper = torch.lu_unpack(lu_factors, pivots)
        s = upper.diagonal()
        self.register_buffer("permutation", p)
        self.register_buffer("permutation_t", p.T.contiguous(), persistent=False)  # P^T = P^{-1}, for the inverse
        self.register_load_state_dict_post_hook(_refresh_permutation_t)
        self.register_buffer("sign_s", s.sign())
        self.register_buffer("lower_mask", torch.ones(c, c).tril(-1))
        # Constants built once here rather than on every call (not persistent: the state_dict is unchanged).
        self.register_buffer("upper_mask", torch.ones(c, c).triu(1), persistent=False)
        self.register_buffer("eye", torch.eye(c), persistent=False)
        self.lower = nn.Parameter(lower.tril(-1).contiguous())
        self.upper = nn.Parameter(upper.triu(1).contiguous())
        self.log_s = nn.Parameter(s.abs().log().contiguous())

    def _upper(self) -> Tensor:
        """``U + diag(sign(s) exp(log|s|))``: the upper factor with its diagonal."""
        return torch.addcmul(torch.diag(self.sign_s * self.log_s.exp()), self.upper, self.upper_mask)

    def matrix(self) -> Tensor:
        """The ``C x C`` matrix ``W``."""
        if not self.lu:
            return self.weight
        lower = torch.addcmul(self.eye, self.lower, self.lower_mask)
        return self.permutation @ lower @ self._upper()

    def inverse_matrix(self) -> Tensor:
        """``W^{-1} = U^{-1} L^{-1} P^T``, from two triangular solves in the LU form.

        The solve with ``L`` reads the parameter as it is: ``unitriangular=True`` takes the strictly lower
        part and a unit diagonal, and its gradient is strictly lower, as that of the masked factor.
        """
        if not self.lu:
            return torch.linalg.inv(self.weight)
        inv_lower_pt = torch.linalg.solve_triangular(self.lower, self.permutation_t, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(self._upper(), inv_lower_pt, upper=True)

    def log_abs_det(self) -> Tensor:
        """``log|det W|`` (a scalar): ``sum log|s|`` in the LU form."""
        return self.log_s.sum() if self.lu else torch.linalg.slogdet(self.weight)[1]

    def _log_det(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        return (h * w * self.log_abs_det()).expand(x.shape[:-3])

    @property
    def sign(self) -> int:
        """The sign of the determinant of the whole map: ``sign(det W) ** (H W)``."""
        if self.lu:
            det_sign = torch.linalg.det(self.permutation) * self.sign_s.prod()
        else:
            det_sign = torch.linalg.slogdet(self.weight.detach())[0]
        return int(round(float(det_sign))) ** self.pixels

    @staticmethod
    def _mix(matrix: Tensor, x: Tensor) -> Tensor:
        return _mix_channels(matrix, x)

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with _full_precision(x):
            return _mix_channels(self.matrix(), x), self._log_det(x)

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        with _full_precision(y):
            return _mix_channels(self.inverse_matrix(), y), self._log_det(y)


def _refresh_permutation_t(module: nn.Module, incompatible_keys: object) -> None:
    """After ``load_state_dict``: ``P^T`` (not saved) from the loaded ``P``."""
    with torch.no_grad():
        module.get_buffer("permutation_t").copy_(module.get_buffer("permutation").T)


def invertible_conv1x1(input_shape: Sequence[int], lu: bool = True) -> InvertibleConv1x1:
    """An :class:`InvertibleConv1x1` over images of shape ``input_shape``."""
    return InvertibleConv1x1(input_shape, lu)


class GlowStep(FlowStack):
    """One step of Glow: ActNorm, invertible 1x1 convolution, coupling (data to noise).

    As a transform (base to data) the parts are the coupling, the 1x1
    convolution and ActNorm, in that order. The coupling is a channel-masked
    :class:`~pyro_nf.transforms.image_coupling.ImageCoupling` with Glow's network
    (:class:`~pyro_nf.nn.conv.GlowNet`).

    Args:
        input_shape: the image shape ``(C, H, W)``, ``C >= 2``.
        hidden_channels: width of the coupling network.
        coupling: ``"affine"``, ``"additive"`` or ``"spline"``.
        lu: LU-decomposed 1x1 convolution.
        scale, log_scale_bound: the coupling's scale (see :class:`~pyro_nf.transforms.image_coupling.ImageCoupling`).
        bins, bound: ``coupling="spline"`` only (see :func:`~pyro_nf.transforms.image_coupling.image_coupling`).

    Example::

        >>> step = GlowStep((4, 2, 2), hidden_channels=8)
        >>> [type(p).__name__ for p in step]
        ['ImageCoupling', 'InvertibleConv1x1', 'ActNorm']
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden_channels: int = 512,
        coupling: CouplingKind = "affine",
        lu: bool = True,
        scale: Scale = "softclamp",
        log_scale_bound: float = LOG_SCALE_BOUND,
        bins: int | None = None,
        bound: float | None = None,
    ) -> None:
        shape = check_image_shape(input_shape)
        layer = image_coupling(
            shape,
            hidden_channels,
            coupling=coupling,
            network="glow",
            scale=scale,
            log_scale_bound=log_scale_bound,
            bins=bins,
            bound=bound,
        )
        super().__init__([layer, InvertibleConv1x1(shape, lu), ActNorm(shape)])

    # ActNorm and the 1x1 convolution act on the channels at every pixel: one C x C matrix and one
    # shift do both, so an image passes through them as one product (no separate element-wise pass).
    def _fused(self) -> tuple[Transform, InvertibleConv1x1, ActNorm] | None:
        """``(coupling, 1x1 conv, ActNorm)`` when ActNorm's map is fixed (no initialisation pending), else None."""
        coupling, conv, norm = self.parts
        if not isinstance(conv, InvertibleConv1x1) or not isinstance(norm, ActNorm):
            return None
        if norm.initialisation_pending():  # the unfused path initialises ActNorm from this batch
            return None
        return coupling, conv, norm

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        parts = self._fused()
        if parts is None:
            return super()._forward_and_log_det(x)
        coupling, conv, norm = parts
        h, coupling_log_det = fused_forward(coupling, x)
        with _full_precision(h):
            matrix = conv.matrix() * norm.log_scale.exp().reshape(-1, 1)  # diag(exp(s)) W
            y = _mix_channels(matrix, h) + norm.loc
        return y, self._add_log_det_mixing(coupling_log_det, conv, norm, x)

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        parts = self._fused()
        if parts is None:
            return super()._inverse_and_log_det(y)
        coupling, conv, norm = parts
        with _full_precision(y):
            matrix = conv.inverse_matrix() * (-norm.log_scale).exp().reshape(1, -1)  # W^{-1} diag(exp(-s))
            z = _mix_channels(matrix, y - norm.loc)
        x, coupling_log_det = fused_inverse(coupling, z)
        return x, self._add_log_det_mixing(coupling_log_det, conv, norm, y)

    @staticmethod
    def _add_log_det_mixing(log_det: Tensor, conv: InvertibleConv1x1, norm: ActNorm, x: Tensor) -> Tensor:
        """``log_det + H W (log|det W| + sum s)``: the 1x1 convolution's and ActNorm's log-det added in one op."""
        return torch.add(log_det, conv.log_abs_det() + norm.log_scale.sum(), alpha=x.shape[-2] * x.shape[-1])


def glow_step(
    input_shape: Sequence[int], hidden_channels: int = 512, coupling: CouplingKind = "affine", lu: bool = True
) -> GlowStep:
    """A :class:`GlowStep` over images of shape ``input_shape``."""
    return GlowStep(input_shape, hidden_channels, coupling, lu)


class GlowOptions(TypedDict, total=False):
    """Keyword options of :func:`glow` and :func:`conditional_glow`."""

    lu: bool
    learned_prior: bool
    scale: Scale
    log_scale_bound: float
    bins: int
    bound: float


def glow(
    input_shape: Sequence[int],
    levels: int = 3,
    depth: int = 32,
    hidden_channels: int = 512,
    coupling: CouplingKind = "affine",
    **options: Unpack[GlowOptions],
) -> FlowStack:
    """The multiscale Glow model as one bijection over ``(C, H, W)``.

    Each level (data to noise): squeeze, ``depth`` :class:`GlowStep` s, and, except
    at the last level, factor out half of the channels with Glow's learned prior
    (an affine coupling of the factored-out half on the kept half, see
    :func:`~pyro_nf.transforms.image_coupling.prior_coupling`). The base is a standard
    Normal of the image's shape::

        TransformedDistribution(Normal(0, 1).expand(shape).to_event(3), [glow(shape)])

    and sampling at temperature ``T`` scales the base noise by ``T``
    (:meth:`pyro_nf.FlowModel.sample`).

    Args:
        input_shape: the image shape ``(C, H, W)``; H and W divisible by ``2 ** levels``.
        levels: number of levels (squeezes), L in the paper.
        depth: Glow steps per level, K in the paper.
        hidden_channels: width of the coupling networks (512 in the paper).
        coupling: ``"affine"``, ``"additive"`` or ``"spline"`` (the rational-quadratic spline of neural
            spline flows; the learned prior stays Gaussian).
        lu: LU-decomposed 1x1 convolutions (default True).
        learned_prior: Glow's learned prior for the factored-out channels (default True; else standard Normal).
        scale, log_scale_bound: the couplings' scale (default ``"softclamp"``, 3); ``scale="gate"`` is
            Glow's ``sigmoid(h + 2)``.
        bins, bound: ``coupling="spline"`` only: bins of each spline (default 8) and the half-width of the
            interval it acts on (default 5, the identity outside).

    Example::

        >>> flow = glow((1, 8, 8), levels=2, depth=2, hidden_channels=16)
        >>> x = torch.randn(3, 1, 8, 8)
        >>> torch.allclose(flow.inv(flow(x)), x, atol=1e-5)
        True
    """
    check_options("glow", options, GlowOptions)
    shape = check_image_shape(input_shape)
    check_positive_int(levels, "levels")
    check_positive_int(depth, "depth")
    check_positive_int(hidden_channels, "hidden_channels")
    check_squeezable(shape, levels, "glow", f"levels = {levels}")
    lu = options.get("lu", True)
    scale = options.get("scale", "softclamp")
    bound = options.get("log_scale_bound", LOG_SCALE_BOUND)
    bins, spline_bound = options.get("bins"), options.get("bound")
    image_map(coupling, scale, bound, bins, spline_bound)  # the choice and the spline's sizes, checked once
    return multiscale(
        shape,
        levels,
        after=lambda s, i: [
            GlowStep(s, hidden_channels, coupling, lu, scale, bound, bins, spline_bound) for _ in range(depth)
        ],
        prior=(lambda s: prior_coupling(s, scale, bound)) if options.get("learned_prior", True) else None,
    )


def conditional_glow(
    input_shape: Sequence[int],
    context_dim: int,
    levels: int = 3,
    depth: int = 32,
    hidden_channels: int = 512,
    coupling: CouplingKind = "affine",
    **options: Unpack[GlowOptions],
) -> ConditionalFlowStack:
    """Class-conditional Glow: :func:`glow` over a prior that depends on a context.

    As in the Glow paper's class-conditional models, the context conditions the prior,
    not the couplings: :class:`~pyro_nf.transforms.conditional_prior.ConditionalLatentAffine`
    maps the standard Normal base noise to ``N(mu(c), exp(2 alpha(c)))`` (one mean and
    log-scale per element, a zero-initialised linear map of the context ``c``), then the
    unconditional Glow maps it to the image. ``.condition(c)`` gives the transform at a
    context; the context's batch shape broadcasts against the images'. Sampling at
    temperature ``T`` scales the base noise, so the conditional prior's standard deviation, by ``T``.

    Args:
        input_shape: the image shape ``(C, H, W)``; H and W divisible by ``2 ** levels``.
        context_dim: size of the context (the number of classes for one-hot labels).
        levels, depth, hidden_channels, coupling, options: as in :func:`glow`; ``scale`` and
            ``log_scale_bound`` also set the prior's scale.

    Example::

        >>> from pyro_nf import ConditionalFlowModel
        >>> flow = conditional_glow((1, 8, 8), context_dim=10, levels=2, depth=2, hidden_channels=16)
        >>> model = ConditionalFlowModel(flow, (1, 8, 8), context_dim=10)
        >>> labels = torch.nn.functional.one_hot(torch.tensor([3, 7]), 10).float()
        >>> model.log_prob(torch.randn(2, 1, 8, 8), labels).shape
        torch.Size([2])
        >>> model.condition(labels).sample((5,)).shape
        torch.Size([5, 2, 1, 8, 8])
    """
    check_options("conditional_glow", options, GlowOptions)
    flow = glow(input_shape, levels, depth, hidden_channels, coupling, **options)
    prior = ConditionalLatentAffine(
        input_shape, context_dim, options.get("scale", "softclamp"), options.get("log_scale_bound", LOG_SCALE_BOUND)
    )
    return ConditionalFlowStack([prior, flow])
