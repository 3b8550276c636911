"""Coupling layers over images: the channel and checkerboard splits on the one coupling skeleton.

An image coupling is a :class:`~pyro_nf.transforms.coupling.ConditionedCoupling` whose split
works on ``(C, H, W)`` and whose network is convolutional (:mod:`pyro_nf.nn.conv`):

- :class:`ChannelSplit`: half the channels condition the other half (Glow, the squeezed
  levels of RealNVP); the network maps ``(C_a, H, W)`` to ``P C_b`` channels, ``P`` raw
  parameters per moved channel and pixel.
- :class:`CheckerboardSplit`: the pixels with ``(h + w) % 2 == parity`` are kept (RealNVP); the
  network reads ``x * mask`` (``C`` channels) and gives ``P C`` channels, used on the other
  pixels only.

:func:`image_coupling` builds one with its network; :func:`prior_coupling` is Glow's learned
prior for factored-out channels, ``p(z | h) = N(mu(h), exp(alpha(h)))``, as an affine coupling.

Dinh et al., "Density estimation using Real NVP", ICLR 2017;
Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from pyro_nf.checks import check_choice, check_image_shape, check_positive_int
from pyro_nf.nn.conv import NORMS, GlowNet, Norm, ResNet, ZeroConv2d
from pyro_nf.transforms.coupling import Coupling
from pyro_nf.transforms.elementwise import LOG_SCALE_BOUND, AdditiveMap, AffineMap, ElementwiseMap, Scale
from pyro_nf.transforms.rational_quadratic import spline_map

__all__ = ["image_coupling", "prior_coupling"]  # the factories first
__all__ += ["ChannelSplit", "CheckerboardSplit", "ImageCoupling"]
__all__ += ["checkerboard", "channel_split", "image_map"]

CouplingKind = Literal["affine", "additive", "spline"]
ImageMask = Literal["channel", "checkerboard"]
Network = Literal["glow", "resnet"]
COUPLINGS: tuple[CouplingKind, ...] = get_args(CouplingKind)
IMAGE_MASKS: tuple[ImageMask, ...] = get_args(ImageMask)
NETWORKS: tuple[Network, ...] = get_args(Network)


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


class ChannelSplit(nn.Module):
    """Half the channels of ``(C, H, W)`` are kept (see :func:`channel_split`), the others moved."""

    event_dims = 3

    def __init__(self, input_shape: tuple[int, int, int], parity: int = 0) -> None:
        super().__init__()
        if input_shape[0] < 2:
            raise ValueError(
                f"ImageCoupling: a channel mask needs at least 2 channels, got input_shape {input_shape}; "
                "use mask='checkerboard' or squeeze first"
            )
        self.input_shape = input_shape
        self.parity = parity
        self.kept, self.moved = channel_split(input_shape[0], parity)
        half = input_shape[0] // 2
        self._sizes = [half, input_shape[0] - half]

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # One split (its backward is one concatenation) rather than two slices (two zero-filled scatters).
        first, last = x.split(self._sizes, dim=-3)
        return (first, last) if self.parity == 0 else (last, first)

    def params(self, raw: Tensor, num_params: int) -> Sequence[Tensor]:
        return raw.chunk(num_params, dim=-3)

    def join(self, x_a: Tensor, x_b: Tensor, y_b: Tensor) -> Tensor:
        return torch.cat((x_a, y_b) if self.parity == 0 else (y_b, x_a), dim=-3)

    def log_det(self, ladj: Tensor) -> Tensor:
        # keepdim and a view: the backward is one expand (no unsqueeze of each summed dimension)
        return ladj.sum((-3, -2, -1), keepdim=True).view(ladj.shape[:-3])


class CheckerboardSplit(nn.Module):
    """The pixels with ``(h + w) % 2 == parity`` are kept; the network reads the image with the others zeroed."""

    event_dims = 3
    kept_pixels: Tensor
    kept_bool: Tensor

    def __init__(self, input_shape: tuple[int, int, int], parity: int = 0) -> None:
        super().__init__()
        self.input_shape = input_shape
        mask = checkerboard(input_shape[1], input_shape[2], parity)
        self.register_buffer("kept_pixels", mask, persistent=False)
        self.register_buffer("kept_bool", mask.bool(), persistent=False)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.kept_pixels, x

    def params(self, raw: Tensor, num_params: int) -> Sequence[Tensor]:
        return raw.chunk(num_params, dim=-3)

    def join(self, x_a: Tensor, x_b: Tensor, y_b: Tensor) -> Tensor:
        return torch.where(self.kept_bool, x_b, y_b)

    def log_det(self, ladj: Tensor) -> Tensor:
        return (ladj * (1.0 - self.kept_pixels)).sum((-3, -2, -1))


def image_map(
    coupling: CouplingKind, scale: Scale, log_scale_bound: float, bins: int | None = None, bound: float | None = None
) -> ElementwiseMap:
    """The element-wise map of an image coupling by name.

    ``"spline"`` is the rational-quadratic spline of neural spline flows with ``bins`` bins on
    ``[-bound, bound]`` (defaults 8 and 5, see
    :class:`~pyro_nf.transforms.rational_quadratic.RationalQuadraticSpline`); ``bins`` and ``bound``
    apply to it only.
    """
    check_choice(coupling, COUPLINGS, "coupling")
    spline = {name: value for name, value in (("bins", bins), ("bound", bound)) if value is not None}
    if coupling == "spline":
        return spline_map(spline, inverted=True)[0]  # closed form from data to noise, as the vector couplings
    if spline:
        raise ValueError(f"{' and '.join(spline)} apply to coupling='spline', got coupling={coupling!r}")
    return AffineMap(scale, log_scale_bound) if coupling == "affine" else AdditiveMap()


class ImageCoupling(Coupling):
    """Affine or additive coupling over an image with a channel or checkerboard mask.

    With kept entries ``x_a`` and moved entries ``x_b`` the forward (base to data) map is

    .. math::

        y_a = x_a, \\qquad y_b = x_b \\odot \\exp(\\alpha(x_a)) + \\mu(x_a), \\qquad
        \\log|\\det \\partial y/\\partial x| = \\textstyle\\sum \\alpha(x_a),

    with ``alpha = 0`` for ``coupling="additive"`` (volume preserving, NICE and
    Glow's additive variant); ``coupling="spline"`` maps ``y_b`` to ``x_b`` by the rational-quadratic
    spline of neural spline flows in closed form (data to noise, as in the paper; noise to data by
    its root), ``3K - 1`` network outputs per moved entry. Both directions cost
    one network pass. Any other element-wise map can be given as ``elementwise``.

    - ``mask="channel"``: ``x_a`` is half the channels (see :func:`channel_split`); the
      network maps ``(C_a, H, W)`` to ``P C_b`` channels (``P = 2`` for affine, 1 for additive).
    - ``mask="checkerboard"``: ``x_a`` are the pixels with ``(h + w) % 2 == parity``; the network
      reads ``x * mask`` (``C`` channels) and gives ``P C`` channels, used on the other pixels.

    The log-scale comes from :func:`pyro_nf.transforms.elementwise.shift_and_log_scale`:
    ``"softclamp"`` (``alpha = B tanh(b / B)``, free to expand and contract, the default) or
    ``"gate"`` (``exp(alpha) = sigmoid(b + 2)``, Glow's scale).

    Args:
        input_shape: the image shape ``(C, H, W)``.
        net: the conditioner network (see :mod:`pyro_nf.nn.conv`); use :func:`image_coupling`
            to build one with the right channel counts.
        mask: ``"channel"`` or ``"checkerboard"``.
        parity: which half is kept (0 or 1).
        coupling: ``"affine"``, ``"additive"`` or ``"spline"`` (8 bins on ``[-5, 5]``; see
            :func:`image_coupling` for other sizes).
        scale, log_scale_bound: how the raw scale becomes a log-scale.
        elementwise: an element-wise map that replaces the one ``coupling`` names.

    Example::

        >>> layer = image_coupling((2, 4, 4), hidden_channels=8)
        >>> y, log_det = layer.forward_and_log_det(torch.randn(3, 2, 4, 4))
        >>> log_det.tolist()  # the network starts at zero: the identity
        [0.0, 0.0, 0.0]
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        net: nn.Module,
        mask: ImageMask = "channel",
        parity: int = 0,
        coupling: CouplingKind = "affine",
        scale: Scale = "softclamp",
        log_scale_bound: float = LOG_SCALE_BOUND,
        cache_size: int = 1,
        elementwise: ElementwiseMap | None = None,
    ) -> None:
        shape = check_image_shape(input_shape)
        check_choice(mask, IMAGE_MASKS, "mask")
        check_choice(parity, (0, 1), "parity")
        g = elementwise if elementwise is not None else image_map(coupling, scale, log_scale_bound)
        split = ChannelSplit(shape, parity) if mask == "channel" else CheckerboardSplit(shape, parity)
        super().__init__(net, split, g, cache_size)
        self.mask = mask
        self.parity = parity
        self.coupling = coupling


def image_coupling(
    input_shape: Sequence[int],
    hidden_channels: int = 512,
    *,
    mask: ImageMask = "channel",
    parity: int = 0,
    coupling: CouplingKind = "affine",
    network: Network = "glow",
    num_blocks: int = 2,
    norm: Norm = "group",
    scale: Scale = "softclamp",
    log_scale_bound: float = LOG_SCALE_BOUND,
    elementwise: ElementwiseMap | None = None,
    bins: int | None = None,
    bound: float | None = None,
) -> ImageCoupling:
    """An :class:`ImageCoupling` with its convolutional network built to fit.

    Args:
        input_shape: the image shape ``(C, H, W)``.
        hidden_channels: width of the network.
        mask, parity, coupling, scale, log_scale_bound, elementwise: see :class:`ImageCoupling`.
        network: ``"glow"`` (:class:`~pyro_nf.nn.conv.GlowNet`) or ``"resnet"``
            (:class:`~pyro_nf.nn.conv.ResNet` with ``num_blocks`` and ``norm``).
        bins, bound: ``coupling="spline"`` only: the spline's bins (default 8) and the half-width of
            the interval it acts on (default 5; the identity outside).

    Example::

        >>> layer = image_coupling((1, 4, 4), 8, mask="checkerboard", network="resnet", num_blocks=1)
        >>> layer(torch.randn(2, 1, 4, 4)).shape
        torch.Size([2, 1, 4, 4])
    """
    shape = check_image_shape(input_shape)
    check_choice(mask, IMAGE_MASKS, "mask")
    check_choice(network, NETWORKS, "network")
    check_choice(norm, NORMS, "norm")
    check_positive_int(hidden_channels, "hidden_channels")
    g = elementwise if elementwise is not None else image_map(coupling, scale, log_scale_bound, bins, bound)
    if mask == "channel":
        if shape[0] < 2:
            raise ValueError(
                f"image_coupling: a channel mask needs at least 2 channels, got input_shape {shape}; "
                "use mask='checkerboard' or squeeze first"
            )
        kept, moved = channel_split(shape[0], parity)
        c_in, c_out = kept.stop - kept.start, g.num_params * (moved.stop - moved.start)
    else:
        c_in, c_out = shape[0], g.num_params * shape[0]
    net: nn.Module
    if network == "glow":
        net = GlowNet(c_in, hidden_channels, c_out)
    else:
        net = ResNet(c_in, hidden_channels, c_out, num_blocks=num_blocks, norm=norm)
    return ImageCoupling(shape, net, mask, parity, coupling, scale, log_scale_bound, elementwise=g)


def prior_coupling(
    input_shape: Sequence[int], scale: Scale = "softclamp", log_scale_bound: float = LOG_SCALE_BOUND
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
