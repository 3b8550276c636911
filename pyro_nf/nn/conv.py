"""Convolutional conditioner networks for coupling layers over images.

Every network maps an image-shaped tensor ``(..., C_in, H, W)`` to
``(..., C_out, H, W)`` (any number of batch dimensions, flattened for the
convolutions and restored afterwards) and ends in a zero-initialised
convolution, so a coupling layer built on it starts at the identity (affine
couplings with the soft clamp) and the flow starts close to its base.

- :class:`GlowNet`: Glow's coupling network, ``3x3 conv -> ReLU -> 1x1 conv ->
  ReLU -> zero-initialised 3x3 conv`` (Kingma & Dhariwal, 2018).
- :class:`ResNet`: RealNVP's residual network, a 3x3 convolution, residual
  blocks of ``norm -> ReLU -> 3x3 conv`` twice plus the skip, then
  ``norm -> ReLU -> zero-initialised 3x3 conv`` (Dinh et al., 2017).
- :class:`ZeroConv2d`: one zero-initialised 3x3 convolution, the network of
  Glow's learned prior for the factored-out channels.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

Norm = Literal["batch", "group", "none"]
NORMS: tuple[Norm, ...] = ("batch", "group", "none")


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _zero_conv(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _apply_2d(net: nn.Module, x: Tensor) -> Tensor:
    """Run a 4D-only module on ``(..., C, H, W)``, flattening and restoring the batch dims."""
    if x.dim() == 4:  # one batch dimension: no reshaping needed
        return net(x)  # type: ignore[no-any-return]
    if x.dim() < 3:
        raise ValueError(f"expected an image tensor of shape (..., C, H, W), got shape {tuple(x.shape)}")
    batch = x.shape[:-3]
    out = net(x.reshape(-1, *x.shape[-3:]))
    return out.reshape(*batch, *out.shape[-3:])


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # per-sample statistics: the network, and so the flow, stays a per-sample bijection in training mode
        # 8 groups of at least 2 channels, else one group (a layer norm over channels and pixels)
        return nn.GroupNorm(8 if channels % 8 == 0 and channels >= 16 else 1, channels)
    return nn.Identity()


class ZeroConv2d(nn.Module):
    """One 3x3 convolution that starts at zero: ``(..., C_in, H, W) -> (..., C_out, H, W)``.

    Example::

        >>> import torch
        >>> ZeroConv2d(2, 4)(torch.randn(5, 2, 3, 3)).abs().max().item()
        0.0
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        _positive_int(in_channels, "in_channels")
        _positive_int(out_channels, "out_channels")
        self.conv = _zero_conv(in_channels, out_channels, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return _apply_2d(self.conv, x)


class GlowNet(nn.Module):
    """Glow's coupling network: ``3x3 conv -> ReLU -> 1x1 conv -> ReLU -> zero 3x3 conv``.

    Args:
        in_channels: channels read (the kept half).
        hidden_channels: width of the two hidden layers (512 in the paper).
        out_channels: channels produced (shift and scale of the moved half).

    Example::

        >>> import torch
        >>> net = GlowNet(2, 16, 4)
        >>> net(torch.randn(3, 2, 4, 4)).shape, net(torch.randn(3, 2, 4, 4)).abs().max().item()
        (torch.Size([3, 4, 4, 4]), 0.0)

    Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018.
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int) -> None:
        super().__init__()
        for value, name in ((in_channels, "in_channels"), (hidden_channels, "hidden_channels")):
            _positive_int(value, name)
        _positive_int(out_channels, "out_channels")
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(),
            _zero_conv(hidden_channels, out_channels, 3),
        )

    def forward(self, x: Tensor) -> Tensor:
        return _apply_2d(self.layers, x)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, norm: Norm) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            _norm(norm, channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            _norm(norm, channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x)


class ResNet(nn.Module):
    """RealNVP's residual coupling network with normalisation and a zero-initialised output.

    ``3x3 conv -> num_blocks x [norm -> ReLU -> 3x3 conv -> norm -> ReLU -> 3x3 conv, + skip]
    -> norm -> ReLU -> zero 3x3 conv``.

    Args:
        in_channels: channels read.
        hidden_channels: width of the residual blocks (64 in the paper's CIFAR-10 model).
        out_channels: channels produced.
        num_blocks: number of residual blocks (8 in the paper, 2 is plenty for small images).
        norm: ``"batch"`` (the paper's choice; the coupling then depends on the whole batch while
            training, exactly invertible per sample in ``eval()`` mode), ``"group"`` (per-sample
            statistics, a bijection per sample in both modes; the default) or ``"none"``.

    Example::

        >>> import torch
        >>> net = ResNet(1, 8, 2, num_blocks=1)
        >>> net(torch.randn(3, 1, 4, 4)).shape
        torch.Size([3, 2, 4, 4])

    Dinh et al., "Density estimation using Real NVP", ICLR 2017.
    """

    def __init__(
        self, in_channels: int, hidden_channels: int, out_channels: int, num_blocks: int = 2, norm: Norm = "group"
    ) -> None:
        super().__init__()
        for value, name in (
            (in_channels, "in_channels"),
            (hidden_channels, "hidden_channels"),
            (out_channels, "out_channels"),
        ):
            _positive_int(value, name)
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks: expected a non-negative int, got {num_blocks!r}")
        if norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            *(_ResidualBlock(hidden_channels, norm) for _ in range(num_blocks)),
            _norm(norm, hidden_channels),
            nn.ReLU(),
            _zero_conv(hidden_channels, out_channels, 3),
        )

    def forward(self, x: Tensor) -> Tensor:
        return _apply_2d(self.layers, x)
