"""RealNVP's multiscale architecture as one bijection over the image, and its building blocks.

An image flow in the data-to-noise direction repeats: *squeeze* (space to
depth), a block of coupling layers, *factor out* half of the channels, and
goes on with the other half at half the resolution. Here the factored-out
channels are not dropped: they are carried through the later levels
unchanged and the level ends by undoing its squeeze, so the whole model is a
plain bijection over ``(C, H, W)`` with event dim 3 and a standard Normal base
of the same shape::

    TransformedDistribution(Normal(0, 1).expand(shape).to_event(3), [realnvp_multiscale(shape)])

is the model. Glow's learned prior for the factored-out half,
``p(z | h) = N(z; mu(h), sigma(h))``, is an affine coupling of ``z`` on the
kept half ``h`` over a standard Normal, and :class:`FactorOut` builds it that
way.

Blocks:

- :class:`Squeeze`: ``(C, H, W) -> (4C, H/2, W/2)`` (factor 2), a volume-preserving
  permutation of the entries, with ``forward_shape`` / ``inverse_shape``.
- :class:`ImageCoupling`: affine or additive coupling over an image with a
  channel mask (half the channels condition the other half) or RealNVP's
  checkerboard mask, and a convolutional network from :mod:`pyro_nf.nn.conv`.
- :class:`FactorOut`: applies an inner flow to the kept half of the channels,
  optionally followed by the learned prior coupling of the factored-out half.

Dinh et al., "Density estimation using Real NVP", ICLR 2017;
Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from pyro_nf.core import FlowStack, FlowTransform, FlowTransformModule, InverseTransformModule
from pyro_nf.nn.conv import NORMS, GlowNet, Norm, ResNet, ZeroConv2d
from pyro_nf.transforms.affine import Scale, check_scale, shift_and_log_scale

Coupling = Literal["affine", "additive"]
ImageMask = Literal["channel", "checkerboard"]
Network = Literal["glow", "resnet"]
COUPLINGS: tuple[Coupling, ...] = ("affine", "additive")
IMAGE_MASKS: tuple[ImageMask, ...] = ("channel", "checkerboard")
NETWORKS: tuple[Network, ...] = ("glow", "resnet")

_IMAGE = constraints.independent(constraints.real, 3)


def check_image_shape(shape: object, name: str = "input_shape") -> tuple[int, int, int]:
    """Check that ``shape`` is an image event shape ``(C, H, W)`` of positive ints and return it as a tuple."""
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 3:
        raise ValueError(f"{name}: expected an image shape (C, H, W) of three positive ints, got {shape!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"{name}: expected an image shape (C, H, W) of three positive ints, got {tuple(shape)!r}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def check_squeezable(shape: tuple[int, int, int], num_squeezes: int, who: str, levels: str) -> None:
    """A ``ValueError`` naming the shape and the levels unless H and W divide by ``2 ** num_squeezes``."""
    factor = 2**num_squeezes
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(
            f"{who}: input_shape {shape} does not fit {levels}: the image is squeezed {num_squeezes} times, "
            f"so H and W must be divisible by 2**{num_squeezes} = {factor}, got H = {shape[1]} and W = {shape[2]}"
        )


def _check_choice(value: object, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


class _ParameterFree(FlowTransformModule):
    """A transform without parameters that still knows its dtype and device (for the input checks)."""

    def __init__(self, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.register_buffer("_reference", torch.zeros(0), persistent=False)


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
        _positive_int(factor, "factor")
        if shape[1] % factor or shape[2] % factor:
            raise ValueError(
                f"Squeeze: expected H and W divisible by factor = {factor}, got input_shape {shape}; "
                "crop or pad the image"
            )
        self.factor = factor
        self.input_shape = shape

    def forward_shape(self, shape: Sequence[int]) -> torch.Size:
        *batch, c, h, w = shape
        f = self.factor
        return torch.Size([*batch, c * f * f, h // f, w // f])

    def inverse_shape(self, shape: Sequence[int]) -> torch.Size:
        *batch, c, h, w = shape
        f = self.factor
        return torch.Size([*batch, c // (f * f), h * f, w * f])

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        *batch, c, h, w = x.shape
        f, n = self.factor, len(batch)
        y = x.reshape(*batch, c, h // f, f, w // f, f)
        y = y.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3).reshape(*batch, c * f * f, h // f, w // f)
        return y, x.new_zeros(batch)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        *batch, c, h, w = y.shape
        f, n = self.factor, len(batch)
        x = y.reshape(*batch, c // (f * f), f, f, h, w)
        x = x.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2).reshape(*batch, c // (f * f), h * f, w * f)
        return x, y.new_zeros(batch)


def squeeze(input_shape: Sequence[int], factor: int = 2) -> Squeeze:
    """A :class:`Squeeze` (space to depth) over images of shape ``input_shape``."""
    return Squeeze(input_shape, factor)


def checkerboard(height: int, width: int, parity: int = 0) -> Tensor:
    """Float mask of shape ``(1, H, W)``: 1 where ``(h + w) % 2 == parity`` (the kept pixels)."""
    index = torch.arange(height)[:, None] + torch.arange(width)[None, :]
    return ((index % 2) == parity % 2).to(torch.get_default_dtype())[None]


def channel_split(channels: int, parity: int = 0) -> tuple[slice, slice]:
    """The kept and the moved channel slices of a channel-masked coupling.

    Parity 0 keeps the first ``C // 2`` channels and moves the rest; parity 1
    keeps the last ``C - C // 2`` and moves the first ``C // 2``.
    """
    half = channels // 2
    return (slice(0, half), slice(half, channels)) if parity % 2 == 0 else (slice(half, channels), slice(0, half))


def _zero_log_det(mu: Tensor, batch: torch.Size) -> Tensor:
    """The log-det of an additive coupling: zeros that stay in the graph of the network's output.

    ``log p(f(z))`` of a volume-preserving flow evaluated at a kept pair does not depend on the
    parameters; keeping the zeros attached lets ``backward()`` run on it all the same.
    """
    return (mu.flatten(-3)[..., :1] * 0).sum(-1).expand(batch)


class ImageCoupling(FlowTransformModule):
    """Affine or additive coupling over an image with a channel or checkerboard mask.

    With kept entries ``x_a`` and moved entries ``x_b`` the forward (base to data) map is

    .. math::

        y_a = x_a, \\qquad y_b = x_b \\odot \\exp(\\alpha(x_a)) + \\mu(x_a), \\qquad
        \\log|\\det \\partial y/\\partial x| = \\textstyle\\sum \\alpha(x_a),

    with ``alpha = 0`` for ``coupling="additive"`` (volume preserving, NICE and
    Glow's additive variant). Both directions cost one network pass.

    - ``mask="channel"``: ``x_a`` is half the channels (see :func:`channel_split`); the
      network maps ``(C_a, H, W)`` to ``k C_b`` channels (``k = 2`` for affine, 1 for additive).
    - ``mask="checkerboard"``: ``x_a`` are the pixels with ``(h + w) % 2 == parity``; the network
      reads ``x * mask`` (``C`` channels) and gives ``k C`` channels, used on the other pixels.

    The log-scale comes from :func:`pyro_nf.transforms.affine.shift_and_log_scale`:
    ``"softclamp"`` (``alpha = B tanh(b / B)``, free to expand and contract, the default) or
    ``"gate"`` (``exp(alpha) = sigmoid(b + 2)``, Glow's scale).

    Args:
        input_shape: the image shape ``(C, H, W)``.
        net: the conditioner network (see :mod:`pyro_nf.nn.conv`); use :func:`image_coupling`
            to build one with the right channel counts.
        mask: ``"channel"`` or ``"checkerboard"``.
        parity: which half is kept (0 or 1).
        coupling: ``"affine"`` or ``"additive"``.
        scale, log_scale_bound: how the raw scale becomes a log-scale.

    Example::

        >>> layer = image_coupling((2, 4, 4), hidden_channels=8)
        >>> y, log_det = layer.forward_and_log_det(torch.randn(3, 2, 4, 4))
        >>> log_det.tolist()  # the network starts at zero: the identity
        [0.0, 0.0, 0.0]
    """

    domain = _IMAGE
    codomain = _IMAGE
    parallel = "both"
    kept_pixels: Tensor

    def __init__(
        self,
        input_shape: Sequence[int],
        net: nn.Module,
        mask: ImageMask = "channel",
        parity: int = 0,
        coupling: Coupling = "affine",
        scale: Scale = "softclamp",
        log_scale_bound: float = 3.0,
        cache_size: int = 1,
    ) -> None:
        super().__init__(cache_size=cache_size)
        shape = check_image_shape(input_shape)
        _check_choice(mask, IMAGE_MASKS, "mask")
        _check_choice(coupling, COUPLINGS, "coupling")
        check_scale(scale, log_scale_bound)
        if parity not in (0, 1):
            raise ValueError(f"parity: expected 0 or 1, got {parity!r}")
        if mask == "channel" and shape[0] < 2:
            raise ValueError(
                f"ImageCoupling: a channel mask needs at least 2 channels, got input_shape {shape}; "
                "use mask='checkerboard' or squeeze first"
            )
        self.input_shape = shape
        self.net = net
        self.mask = mask
        self.parity = parity
        self.coupling = coupling
        self.scale = scale
        self.log_scale_bound = log_scale_bound
        if mask == "checkerboard":
            self.register_buffer("kept_pixels", checkerboard(shape[1], shape[2], parity), persistent=False)
        else:
            self.kept, self.moved = channel_split(shape[0], parity)

    def _params(self, x_a: Tensor, like: Tensor) -> tuple[Tensor, Tensor | None]:
        h = self.net(x_a)
        if self.coupling == "additive":
            return h, None
        a, b = h.chunk(2, dim=-3)
        mu, alpha = shift_and_log_scale(a, b, self.scale, self.log_scale_bound)
        return mu, alpha

    def _couple(self, x: Tensor, forward: bool) -> tuple[Tensor, Tensor]:
        batch = x.shape[:-3]
        if self.mask == "checkerboard":
            kept = self.kept_pixels
            x_a = x * kept
            mu, alpha = self._params(x_a, x)
            moved = 1.0 - kept
            mu = mu * moved
            if alpha is None:
                y = x + mu if forward else x - mu
                return y, _zero_log_det(mu, batch)
            alpha = alpha * moved
            y = x * alpha.exp() + mu if forward else (x - mu) * (-alpha).exp()
            return y, alpha.flatten(-3).sum(-1).expand(batch)
        x_a, x_b = x[..., self.kept, :, :], x[..., self.moved, :, :]
        mu, alpha = self._params(x_a, x)
        if alpha is None:
            y_b = x_b + mu if forward else x_b - mu
            log_det = _zero_log_det(mu, batch)
        else:
            y_b = x_b * alpha.exp() + mu if forward else (x_b - mu) * (-alpha).exp()
            log_det = alpha.flatten(-3).sum(-1)
        parts = (x_a, y_b) if self.parity == 0 else (y_b, x_a)
        return torch.cat(parts, dim=-3), log_det

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(x, forward=True)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(y, forward=False)


def image_coupling(
    input_shape: Sequence[int],
    hidden_channels: int = 512,
    *,
    mask: ImageMask = "channel",
    parity: int = 0,
    coupling: Coupling = "affine",
    network: Network = "glow",
    num_blocks: int = 2,
    norm: Norm = "group",
    scale: Scale = "softclamp",
    log_scale_bound: float = 3.0,
) -> ImageCoupling:
    """An :class:`ImageCoupling` with its convolutional network built to fit.

    Args:
        input_shape: the image shape ``(C, H, W)``.
        hidden_channels: width of the network.
        mask, parity, coupling, scale, log_scale_bound: see :class:`ImageCoupling`.
        network: ``"glow"`` (:class:`~pyro_nf.nn.conv.GlowNet`) or ``"resnet"``
            (:class:`~pyro_nf.nn.conv.ResNet` with ``num_blocks`` and ``norm``).

    Example::

        >>> layer = image_coupling((1, 4, 4), 8, mask="checkerboard", network="resnet", num_blocks=1)
        >>> layer(torch.randn(2, 1, 4, 4)).shape
        torch.Size([2, 1, 4, 4])
    """
    shape = check_image_shape(input_shape)
    _check_choice(mask, IMAGE_MASKS, "mask")
    _check_choice(coupling, COUPLINGS, "coupling")
    _check_choice(network, NETWORKS, "network")
    _check_choice(norm, NORMS, "norm")
    _positive_int(hidden_channels, "hidden_channels")
    k = 2 if coupling == "affine" else 1
    if mask == "channel":
        if shape[0] < 2:
            raise ValueError(
                f"image_coupling: a channel mask needs at least 2 channels, got input_shape {shape}; "
                "use mask='checkerboard' or squeeze first"
            )
        kept, moved = channel_split(shape[0], parity)
        c_in, c_out = kept.stop - kept.start, k * (moved.stop - moved.start)
    else:
        c_in, c_out = shape[0], k * shape[0]
    net: nn.Module
    if network == "glow":
        net = GlowNet(c_in, hidden_channels, c_out)
    else:
        net = ResNet(c_in, hidden_channels, c_out, num_blocks=num_blocks, norm=norm)
    return ImageCoupling(shape, net, mask, parity, coupling, scale, log_scale_bound)


def prior_coupling(
    input_shape: Sequence[int], scale: Scale = "softclamp", log_scale_bound: float = 3.0
) -> ImageCoupling:
    """Glow's learned prior for the factored-out channels, as an affine coupling.

    Over ``(C, H, W)`` the first ``C // 2`` channels ``h`` are kept and the others
    ``z`` are moved: ``z = mu(h) + exp(alpha(h)) eps`` with ``eps`` standard Normal,
    i.e. ``p(z | h) = N(mu(h), exp(alpha(h)))``, with ``(mu, alpha)`` from one
    zero-initialised 3x3 convolution (:class:`~pyro_nf.nn.conv.ZeroConv2d`), as in Glow.

    Example::

        >>> prior = prior_coupling((4, 2, 2))
        >>> prior(torch.randn(3, 4, 2, 2)).shape
        torch.Size([3, 4, 2, 2])
    """
    shape = check_image_shape(input_shape)
    if shape[0] < 2:
        raise ValueError(f"prior_coupling: expected at least 2 channels, got input_shape {shape}")
    kept, moved = channel_split(shape[0], 0)
    net = ZeroConv2d(kept.stop - kept.start, 2 * (moved.stop - moved.start))
    return ImageCoupling(shape, net, "channel", 0, "affine", scale, log_scale_bound)


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

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = self.channels
        h, log_det = self.inner.forward_and_log_det(x[..., :c, :, :])
        y = torch.cat([h, x[..., c:, :, :]], dim=-3)
        if self.prior is not None:
            y, prior_log_det = self.prior.forward_and_log_det(y)
            log_det = log_det + prior_log_det
        return y, log_det

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        c = self.channels
        prior_log_det: Tensor | None = None
        if self.prior is not None:
            y, prior_log_det = self.prior.inverse_and_log_det(y)
        x, log_det = self.inner.inverse_and_log_det(y[..., :c, :, :])
        if prior_log_det is not None:
            log_det = log_det + prior_log_det
        return torch.cat([x, y[..., c:, :, :]], dim=-3), log_det


def squeezed_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The shape after a factor-2 :class:`Squeeze`."""
    return (4 * shape[0], shape[1] // 2, shape[2] // 2)


def level_shapes(shape: tuple[int, int, int], levels: int) -> list[tuple[int, int, int]]:
    """The input shape of each level of a multiscale flow: squeeze, then keep half the channels."""
    shapes = [shape]
    for _ in range(levels - 1):
        s = squeezed_shape(shapes[-1])
        shapes.append((s[0] // 2, s[1], s[2]))
    return shapes


def multiscale_level(
    shape: tuple[int, int, int],
    before: Sequence[Transform],
    after: Sequence[Transform],
    inner: FlowTransform | None,
    prior: ImageCoupling | None,
    squeeze: bool = True,
) -> list[Transform]:
    """The parts, in base-to-data order, of one level of a multiscale flow over ``shape``.

    In the data-to-noise direction a level applies the inverses of ``before``
    (over ``shape``) in order, squeezes, applies the inverses of ``after`` (over
    the squeezed shape), factors out half the channels (the other half going on
    through ``inner``, with the learned ``prior`` when given), and undoes the
    squeeze, so it is a bijection over ``shape``. ``before`` and ``after`` are
    listed in the data-to-noise order of the papers.
    """
    if not squeeze:
        if inner is not None:
            raise ValueError("multiscale_level: a level without a squeeze cannot factor out channels")
        return [*reversed(before)]
    parts: list[Transform] = [Squeeze(shape)]
    if inner is not None:
        parts.append(FactorOut(squeezed_shape(shape), inner, prior))
    parts.extend(reversed(after))
    parts.append(InverseTransformModule(Squeeze(shape)))
    parts.extend(reversed(before))
    return parts


def _with_actnorm(shape: tuple[int, int, int], layers: list[ImageCoupling]) -> list[Transform]:
    from pyro_nf.transforms.glow import ActNorm  # glow.py builds on this module

    return [part for layer in layers for part in (ActNorm(shape), layer)]


def realnvp_multiscale(
    input_shape: Sequence[int],
    num_scales: int = 2,
    hidden_channels: int = 64,
    *,
    num_blocks: int = 2,
    norm: Norm = "group",
    coupling: Coupling = "affine",
    learned_prior: bool = False,
    actnorm: bool = False,
    scale: Scale = "softclamp",
    log_scale_bound: float = 3.0,
) -> FlowStack:
    """RealNVP's multiscale architecture as one bijection over ``(C, H, W)``.

    Each scale but the last (data-to-noise): 3 checkerboard couplings, squeeze,
    3 channel couplings, factor out half the channels. The last scale: 4
    checkerboard couplings. Parities alternate. Couplings use RealNVP's residual
    network (:class:`~pyro_nf.nn.conv.ResNet`). There are ``num_scales - 1``
    squeezes, so H and W must be divisible by ``2 ** (num_scales - 1)``.

    Args:
        input_shape: the image shape ``(C, H, W)``.
        num_scales: number of scales (2 for 8x8 images, 3 for 28x28 would need 32x32 padding).
        hidden_channels: width of the residual networks.
        num_blocks: residual blocks per network.
        norm: normalisation inside the networks (``"group"``, ``"batch"``, ``"none"``).
        coupling: ``"affine"`` or ``"additive"``.
        learned_prior: Glow's learned prior for the factored-out channels (the paper has none).
        actnorm: an :class:`~pyro_nf.transforms.glow.ActNorm` before each coupling (data to noise), in
            place of the paper's batch normalisation of the flow: data-dependent initialisation, and a
            bijection per sample in training mode too.
        scale, log_scale_bound: see :class:`ImageCoupling`.

    Example::

        >>> flow = realnvp_multiscale((1, 4, 4), num_scales=2, hidden_channels=8, num_blocks=1)
        >>> x = torch.randn(3, 1, 4, 4)
        >>> torch.allclose(flow.inv(flow(x)), x, atol=1e-5)
        True

    Dinh et al., "Density estimation using Real NVP", ICLR 2017.
    """
    shape = check_image_shape(input_shape)
    _positive_int(num_scales, "num_scales")
    _positive_int(hidden_channels, "hidden_channels")
    check_squeezable(shape, num_scales - 1, "realnvp_multiscale", f"num_scales = {num_scales}")
    options = dict(
        coupling=coupling,
        network="resnet",
        num_blocks=num_blocks,
        norm=norm,
        scale=scale,
        log_scale_bound=log_scale_bound,
    )
    shapes = level_shapes(shape, num_scales)
    inner: FlowTransform | None = None
    for i in reversed(range(num_scales)):
        s = shapes[i]
        last = i == num_scales - 1
        num_checker = 4 if last else 3
        before = [
            image_coupling(s, hidden_channels, mask="checkerboard", parity=j % 2, **options)  # type: ignore[arg-type]
            for j in range(num_checker)
        ]
        after = (
            []
            if last
            else [
                image_coupling(squeezed_shape(s), hidden_channels, mask="channel", parity=j % 2, **options)  # type: ignore[arg-type]
                for j in range(3)
            ]
        )
        before_parts: list[Transform] = _with_actnorm(s, before) if actnorm else list(before)
        after_parts: list[Transform] = _with_actnorm(squeezed_shape(s), after) if actnorm else list(after)
        prior = prior_coupling(squeezed_shape(s), scale, log_scale_bound) if learned_prior and not last else None
        inner = FlowStack(multiscale_level(s, before_parts, after_parts, inner, prior, squeeze=not last))
    if not isinstance(inner, FlowStack):  # num_scales >= 1, so the loop ran
        raise RuntimeError("realnvp_multiscale: no scale was built")
    return inner
