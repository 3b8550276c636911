"""The multiscale architecture as one bijection over the image: squeeze, factor-out, one builder, RealNVP's model.

An image flow in the data-to-noise direction repeats: a block of steps at the current
resolution, *squeeze* (space to depth), a block of steps at half the resolution, *factor
out* half of the channels, and goes on with the other half. Here the factored-out
channels are not dropped: they are carried through the later levels unchanged and the
level ends by undoing its squeeze, so the whole model is a plain bijection over
``(C, H, W)`` with event dim 3 and a standard Normal base of the same shape::

    TransformedDistribution(Normal(0, 1).expand(shape).to_event(3), [realnvp_multiscale(shape)])

is the model. Glow's learned prior for the factored-out half,
``p(z | h) = N(z; mu(h), sigma(h))``, is an affine coupling of ``z`` on the kept half
``h`` over a standard Normal (:func:`~pyro_nf.transforms.image_coupling.prior_coupling`),
and :class:`FactorOut` builds it that way.

:func:`multiscale` is the one builder of the three image flows: ``levels`` is the number
of squeezes in each (H and W must divide by ``2 ** levels``), and the flows differ only in
the steps they put before and after each squeeze, whether they factor out with a learned
prior, and the final block:

- :func:`~pyro_nf.transforms.glow.glow`: ``depth`` Glow steps after each squeeze, a learned
  prior at each factor-out, and no final block (the last level keeps its channels);
- :func:`realnvp_multiscale`: 3 checkerboard couplings before each squeeze, 3 channel
  couplings after it, and a final block of 4 checkerboard couplings;
- :func:`~pyro_nf.transforms.continuous_multiscale.ffjord_multiscale`: CNF blocks before and after each
  squeeze, and a final block of CNF blocks.

Dinh et al., "Density estimation using Real NVP", ICLR 2017;
Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.distributions import Transform, constraints

from pyro_nf.checks import check_image_shape, check_non_negative_int, check_positive_int
from pyro_nf.core import FlowStack, FlowTransform, FlowTransformModule, InverseTransformModule
from pyro_nf.nn.conv import Norm
from pyro_nf.transforms.elementwise import LOG_SCALE_BOUND, Scale
from pyro_nf.transforms.image_coupling import CouplingKind, ImageCoupling, image_coupling, prior_coupling
from pyro_nf.transforms.normalization import ActNorm

__all__ = ["squeeze", "factor_out", "realnvp_multiscale"]  # the factories first
__all__ += ["Squeeze", "FactorOut"]
__all__ += ["check_squeezable", "squeezed_shape", "level_shapes", "multiscale", "resolve_levels", "warn_num_scales"]

_IMAGE = constraints.independent(constraints.real, 3)
Shape = tuple[int, int, int]
Steps = Callable[[Shape, int], Sequence[Transform]]


def check_squeezable(shape: Shape, num_squeezes: int, who: str, levels: str) -> None:
    """A ``ValueError`` naming the shape and the levels unless H and W divide by ``2 ** num_squeezes``."""
    factor = 2**num_squeezes
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(
            f"{who}: input_shape {shape} does not fit {levels}: the image is squeezed {num_squeezes} times, "
            f"so H and W must be divisible by 2**{num_squeezes} = {factor}, got H = {shape[1]} and W = {shape[2]}"
        )


class _ParameterFree(FlowTransformModule):
    """A transform without parameters that still knows its dtype and device (for the input checks)."""

    def __init__(self, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.register_buffer("_reference", torch.zeros(0), persistent=False)


def _permutation_sign(permutation: Tensor) -> int:
    """The sign (parity) of a permutation of ``0 .. n - 1``."""
    seen = [False] * permutation.numel()
    order, sign = permutation.tolist(), 1
    for start in range(len(order)):
        length, i = 0, start
        while not seen[i]:
            seen[i], i, length = True, order[i], length + 1
        if length and length % 2 == 0:
            sign = -sign
    return sign


class Squeeze(_ParameterFree):
    """Space to depth: ``(..., C, H, W) -> (..., C f^2, H/f, W/f)``, each ``f x f`` block into channels.

    Output channel ``c f^2 + i f + j`` at ``(h, w)`` holds input channel ``c`` at
    ``(h f + i, w f + j)``. A permutation of the entries: the log-det is 0. The
    inverse (depth to space) is ``Squeeze(shape).inv``.

    Args:
        input_shape: the image shape ``(C, H, W)``; H and W divisible by ``factor``.
        factor: the block size (2 in RealNVP and Glow).

    Example::

        >>> squeeze = Squeeze((1, 4, 4))
        >>> squeeze.forward_shape((1, 4, 4))
        torch.Size([4, 2, 2])
        >>> squeeze(torch.arange(16.0).reshape(1, 4, 4))[:, 0, 0].tolist()
        [0.0, 1.0, 4.0, 5.0]
    """

    domain = _IMAGE
    codomain = _IMAGE
    parallel = "both"

    def __init__(self, input_shape: Sequence[int], factor: int = 2, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        shape = check_image_shape(input_shape)
        check_positive_int(factor, "factor")
        if shape[1] % factor or shape[2] % factor:
            raise ValueError(
                f"Squeeze: expected H and W divisible by factor = {factor}, got input_shape {shape}; "
                "crop or pad the image"
            )
        self.factor = factor
        self.input_shape = shape
        self._sign: int | None = None

    def forward_shape(self, shape: Sequence[int]) -> torch.Size:
        *batch, c, h, w = shape
        f = self.factor
        return torch.Size([*batch, c * f * f, h // f, w // f])

    def inverse_shape(self, shape: Sequence[int]) -> torch.Size:
        *batch, c, h, w = shape
        f = self.factor
        return torch.Size([*batch, c // (f * f), h * f, w * f])

    @property
    def sign(self) -> int:
        """The parity of the permutation of the entries (+1 or -1)."""
        if self._sign is None:
            index = torch.arange(self.input_shape[0] * self.input_shape[1] * self.input_shape[2], dtype=torch.float64)
            self._sign = _permutation_sign(
                self._forward_and_log_det(index.reshape(self.input_shape))[0].flatten().long()
            )
        return self._sign

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        *batch, c, h, w = x.shape
        f, n = self.factor, len(batch)
        y = x.reshape(*batch, c, h // f, f, w // f, f)
        y = y.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3).reshape(*batch, c * f * f, h // f, w // f)
        return y, x.new_zeros(batch)

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        *batch, c, h, w = y.shape
        f, n = self.factor, len(batch)
        x = y.reshape(*batch, c // (f * f), f, f, h, w)
        x = x.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2).reshape(*batch, c // (f * f), h * f, w * f)
        return x, y.new_zeros(batch)


def squeeze(input_shape: Sequence[int], factor: int = 2) -> Squeeze:
    """A :class:`Squeeze` (space to depth) over images of shape ``input_shape``."""
    return Squeeze(input_shape, factor)


class FactorOut(FlowTransformModule):
    """Factor out half of the channels: the other half goes on through an inner flow.

    Over ``(C, H, W)`` with ``c = C // 2``, in the data-to-noise direction
    (the inverse): the optional ``prior`` coupling (:func:`prior_coupling`) turns the
    factored-out channels ``z = x[c:]`` into standard Normal noise given the kept
    channels ``h = x[:c]``, then ``inner`` maps ``h`` on, and the noise of ``z`` is
    carried through unchanged. The forward (base to data) map does the reverse,
    so ``FactorOut`` is one bijection over ``(C, H, W)`` whose log-det is the sum of
    the inner flow's and the prior's. Without a prior (RealNVP) the factored-out
    channels are already the noise.

    Args:
        input_shape: the image shape ``(C, H, W)`` with ``C >= 2``.
        inner: a pyro_nf transform over ``(C // 2, H, W)``.
        prior: an :class:`ImageCoupling` over ``(C, H, W)`` with a channel mask of parity 0, or None.

    Example::

        >>> inner = image_coupling((2, 2, 2), 8)
        >>> layer = FactorOut((4, 2, 2), inner, prior_coupling((4, 2, 2)))
        >>> layer.inv(torch.randn(5, 4, 2, 2)).shape
        torch.Size([5, 4, 2, 2])
    """

    domain = _IMAGE
    codomain = _IMAGE

    def __init__(
        self,
        input_shape: Sequence[int],
        inner: FlowTransform,
        prior: ImageCoupling | None = None,
        cache_size: int = 1,
    ) -> None:
        super().__init__(cache_size=cache_size)
        shape = check_image_shape(input_shape)
        if shape[0] < 2:
            raise ValueError(f"FactorOut: expected at least 2 channels, got input_shape {shape}")
        if not isinstance(inner, FlowTransform):
            raise TypeError(f"FactorOut: inner must be a pyro_nf FlowTransform, got {type(inner).__name__}")
        kept = (shape[0] // 2, shape[1], shape[2])
        if inner.input_shape is not None and tuple(inner.input_shape) != kept:
            raise ValueError(f"FactorOut: inner must act on the kept channels, shape {kept}, got {inner.input_shape}")
        if prior is not None:
            if not isinstance(prior, ImageCoupling) or prior.mask != "channel" or prior.parity != 0:
                raise ValueError("FactorOut: prior must be an ImageCoupling with a channel mask of parity 0")
            if prior.input_shape != shape:
                raise ValueError(f"FactorOut: prior must act on input_shape {shape}, got {prior.input_shape}")
        self.input_shape = shape
        self.channels = shape[0] // 2
        self.inner = inner
        self.prior = prior
        self.parallel = inner.parallel

    @property
    def sign(self) -> int:
        return self.inner.sign

    def _halves(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The kept and the factored-out channels (one split: its backward is one concatenation)."""
        kept, out = x.split([self.channels, x.shape[-3] - self.channels], dim=-3)
        return kept, out

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        kept, out = self._halves(x)
        h, log_det = self.inner._forward_and_log_det(kept)
        y = torch.cat([h, out], dim=-3)
        if self.prior is not None:
            y, prior_log_det = self.prior._forward_and_log_det(y)
            log_det = log_det + prior_log_det
        return y, log_det

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        prior_log_det: Tensor | None = None
        if self.prior is not None:
            y, prior_log_det = self.prior._inverse_and_log_det(y)
        kept, out = self._halves(y)
        x, log_det = self.inner._inverse_and_log_det(kept)
        if prior_log_det is not None:
            log_det = log_det + prior_log_det
        return torch.cat([x, out], dim=-3), log_det


def factor_out(input_shape: Sequence[int], inner: FlowTransform, prior: ImageCoupling | None = None) -> FactorOut:
    """A :class:`FactorOut` over ``input_shape`` with ``inner`` on the kept half (and an optional learned prior)."""
    return FactorOut(input_shape, inner, prior)


def squeezed_shape(shape: Shape) -> Shape:
    """The shape after a factor-2 :class:`Squeeze`."""
    return (4 * shape[0], shape[1] // 2, shape[2] // 2)


def level_shapes(shape: Shape, levels: int) -> list[Shape]:
    """The input shape of each level of a multiscale flow: squeeze, then keep half the channels."""
    shapes = [shape]
    for _ in range(levels - 1):
        s = squeezed_shape(shapes[-1])
        shapes.append((s[0] // 2, s[1], s[2]))
    return shapes


def _no_steps(shape: Shape, level: int) -> Sequence[Transform]:
    return []


def multiscale(
    input_shape: Shape,
    levels: int,
    *,
    before: Steps = _no_steps,
    after: Steps = _no_steps,
    prior: Callable[[Shape], ImageCoupling] | None = None,
    final: Callable[[Shape], Sequence[Transform]] | None = None,
) -> FlowStack:
    """A multiscale flow over ``input_shape`` with ``levels`` squeezes, as one :class:`FlowStack`.

    In the data-to-noise direction, level ``i`` (input shape ``s_i``) applies the inverses of
    ``before(s_i, i)``, squeezes, applies the inverses of ``after(squeezed(s_i), i)`` and then,
    unless it is the last level and there is no ``final`` block, factors out half of the
    channels (with the learned ``prior(squeezed(s_i))`` when given) and goes on with the
    other half; after the last level, the inverses of ``final(s_L)``. Each level undoes its
    squeeze, so the result is a bijection over ``input_shape``. The steps are listed in the
    papers' data-to-noise order; the caller checks that the shape divides.
    """
    shapes = level_shapes(input_shape, levels + 1)
    inner: FlowStack | None = FlowStack(list(reversed(final(shapes[levels])))) if final is not None else None
    for i in reversed(range(levels)):
        s = shapes[i]
        s_squeezed = squeezed_shape(s)
        steps_before = before(s, i)
        steps_after = after(s_squeezed, i)
        parts: list[Transform] = [Squeeze(s)]
        if inner is not None:
            parts.append(FactorOut(s_squeezed, inner, prior(s_squeezed) if prior is not None else None))
        parts.extend(reversed(steps_after))
        parts.append(InverseTransformModule(Squeeze(s)))
        parts.extend(reversed(steps_before))
        inner = FlowStack(parts)
    if inner is None:
        raise ValueError("multiscale: nothing to build: give levels >= 1 or a final block")
    return inner


def resolve_levels(who: str, levels: int | None, num_scales: int | None, default: int) -> tuple[int, str]:
    """``levels`` (squeezes) from ``levels`` or the deprecated ``num_scales = levels + 1``, and how to name it.

    The name is the keyword the caller gave (for error messages); the deprecation warning is
    emitted by :func:`warn_num_scales` once the arguments are known to be valid.
    """
    if num_scales is not None:
        if levels is not None:
            raise ValueError(f"{who}: give levels (the number of squeezes) or the deprecated num_scales, not both")
        check_positive_int(num_scales, "num_scales")
        return num_scales - 1, f"num_scales = {num_scales}"
    levels = default if levels is None else check_non_negative_int(levels, "levels")
    return levels, f"levels = {levels}"


def warn_num_scales(who: str, num_scales: int | None) -> None:
    """The deprecation warning of ``num_scales`` (now ``levels = num_scales - 1``)."""
    if num_scales is not None:
        warnings.warn(
            f"{who}: num_scales is deprecated; use levels = num_scales - 1 = {num_scales - 1} (the number of "
            "squeezes, as in glow)",
            DeprecationWarning,
            stacklevel=3,
        )


def _with_actnorm(shape: Shape, layers: Sequence[Transform]) -> list[Transform]:
    return [part for layer in layers for part in (ActNorm(shape), layer)]


def realnvp_multiscale(
    input_shape: Sequence[int],
    *,
    levels: int | None = None,
    hidden_channels: int = 64,
    num_blocks: int = 2,
    norm: Norm = "group",
    coupling: CouplingKind = "affine",
    learned_prior: bool = False,
    actnorm: bool = False,
    scale: Scale = "softclamp",
    log_scale_bound: float = LOG_SCALE_BOUND,
    num_scales: int | None = None,
    bins: int | None = None,
    bound: float | None = None,
) -> FlowStack:
    """RealNVP's multiscale architecture as one bijection over ``(C, H, W)``.

    Each of the ``levels`` levels (data-to-noise): 3 checkerboard couplings, squeeze, 3
    channel couplings, factor out half the channels; then a final block of 4 checkerboard
    couplings. Parities alternate. Couplings use RealNVP's residual network
    (:class:`~pyro_nf.nn.conv.ResNet`). H and W must be divisible by ``2 ** levels``.

    Args:
        input_shape: the image shape ``(C, H, W)``.
        levels: number of squeezes (default 1; 2 for 28x28 images).
        hidden_channels: width of the residual networks.
        num_blocks: residual blocks per network.
        norm: normalisation inside the networks (``"group"``, ``"batch"``, ``"none"``).
        coupling: ``"affine"``, ``"additive"`` or ``"spline"`` (the rational-quadratic spline of neural
            spline flows, its parameters from the residual network).
        learned_prior: Glow's learned prior for the factored-out channels (the paper has none).
        actnorm: an :class:`~pyro_nf.transforms.normalization.ActNorm` before each coupling (data to
            noise), in place of the paper's batch normalisation of the flow: data-dependent
            initialisation, and a bijection per sample in training mode too.
        scale, log_scale_bound: see :class:`~pyro_nf.transforms.image_coupling.ImageCoupling`.
        num_scales: deprecated, ``levels + 1`` (the paper's number of scales).
        bins, bound: ``coupling="spline"`` only: bins of each spline (default 8) and the half-width of the
            interval it acts on (default 5, the identity outside).

    Example::

        >>> flow = realnvp_multiscale((1, 4, 4), levels=1, hidden_channels=8, num_blocks=1)
        >>> x = torch.randn(3, 1, 4, 4)
        >>> torch.allclose(flow.inv(flow(x)), x, atol=1e-5)
        True

    Dinh et al., "Density estimation using Real NVP", ICLR 2017.
    """
    shape = check_image_shape(input_shape)
    levels, named = resolve_levels("realnvp_multiscale", levels, num_scales, 1)
    check_positive_int(hidden_channels, "hidden_channels")
    check_positive_int(num_blocks, "num_blocks")
    check_squeezable(shape, levels, "realnvp_multiscale", named)
    warn_num_scales("realnvp_multiscale", num_scales)

    def couplings(s: Shape, mask: str, count: int) -> list[Transform]:
        layers = [
            image_coupling(
                s,
                hidden_channels,
                mask=mask,  # type: ignore[arg-type]
                parity=j % 2,
                coupling=coupling,
                network="resnet",
                num_blocks=num_blocks,
                norm=norm,
                scale=scale,
                log_scale_bound=log_scale_bound,
                bins=bins,
                bound=bound,
            )
            for j in range(count)
        ]
        return _with_actnorm(s, layers) if actnorm else list(layers)

    return multiscale(
        shape,
        levels,
        before=lambda s, i: couplings(s, "checkerboard", 3),
        after=lambda s, i: couplings(s, "channel", 3),
        prior=(lambda s: prior_coupling(s, scale, log_scale_bound)) if learned_prior else None,
        final=lambda s: couplings(s, "checkerboard", 4),
    )
