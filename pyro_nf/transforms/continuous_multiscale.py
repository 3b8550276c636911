"""FFJORD's multiscale image CNF: continuous blocks between the squeezes and factor-outs of the multiscale builder.

Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
Generative Models", ICLR 2019, section 4.2 and appendix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pyro_nf.checks import check_image_shape, check_positive_int
from pyro_nf.core import FlowStack
from pyro_nf.nn.odefunc import ConvODENet
from pyro_nf.transforms.continuous import FFJORD, FFJORDOptions
from pyro_nf.transforms.multiscale import check_squeezable, multiscale, resolve_levels, warn_num_scales
from pyro_nf.transforms.ode import split_solver_options

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["ffjord_multiscale", "MultiscaleFFJORDOptions"]


class MultiscaleFFJORDOptions(FFJORDOptions, total=False):
    """Keyword options of :func:`ffjord_multiscale`."""

    kernel_size: int


def ffjord_multiscale(
    input_shape: Sequence[int],
    *,
    levels: int | None = None,
    blocks_per_scale: int = 2,
    hidden_channels: int | Sequence[int] = 64,
    num_scales: int | None = None,
    **options: Unpack[MultiscaleFFJORDOptions],
) -> FlowStack:
    """FFJORD's multiscale image CNF (the "ODENVP" of its image experiments) as one bijection over ``(C, H, W)``.

    In the data-to-noise direction each of the ``levels`` levels integrates
    ``blocks_per_scale`` CNF blocks over the current tensor, squeezes it
    (``(C, H, W) -> (4C, H/2, W/2)``), integrates ``blocks_per_scale`` more CNF blocks
    and factors out half of the channels, which are standard Normal noise from then on;
    a final block of ``blocks_per_scale`` CNF blocks works on what is left (no squeeze, no
    factor-out). Every block is an :class:`FFJORD` transform whose field is a
    :class:`~pyro_nf.nn.odefunc.ConvODENet` (3x3 concat-squash convolutions). With blocks
    ``k = 1 .. K`` the log-density is

    .. math::

        \\log p(x) = \\log \\mathcal{N}(z; 0, I)
        - \\sum_{k=1}^{K} \\int_0^{t_1} \\operatorname{Tr}\\frac{\\partial f_k}{\\partial z_k}(z_k(t), t)\\,dt ,

    where ``z`` is the concatenation of every factored-out half and the final block's
    output (the squeezes and the factor-outs are permutations: log-det 0). As in
    :func:`~pyro_nf.transforms.multiscale.realnvp_multiscale` the factored-out channels are
    carried through unchanged and each level undoes its squeeze, so the base is a standard
    Normal of the image's shape::

        TransformedDistribution(Normal(0, 1).expand(shape).to_event(3), [ffjord_multiscale(shape)])

    Preprocessing (dequantization, the logit of the paper's ``alpha = 0.05``) is left to
    :mod:`pyro_nf.transforms.preprocess`. Each block solves its own ODE; statistics are per
    block (``sum(m.nfe for m in flow.modules() if isinstance(m, FFJORD))`` is the NFE of a
    pass, ``sum(m.regularization() ...)`` the RNODE penalty).

    Args:
        input_shape: the image shape ``(C, H, W)``; H and W divisible by ``2 ** levels``.
        levels: number of squeezes and factor-outs (default 1).
        blocks_per_scale: CNF blocks before and after each squeeze, and in the final block (2 in the paper).
        hidden_channels: hidden widths of every field: an int ``h`` gives ``[h, h, h]`` (the
            paper's 64, 64, 64), or a list of widths.
        num_scales: deprecated, ``levels + 1``.
        trace: training-mode trace, ``"hutchinson"`` (default) or ``"exact"`` (``C H W``
            vector-Jacobian products per evaluation: for tiny images only).
        t1, train_t1: integration time of every block, learned or not.
        activation, zero_init: see :class:`~pyro_nf.nn.odefunc.ConvODENet`; with ``zero_init`` the
            whole flow starts at the identity.
        kernel_size: odd kernel size of the convolutions (default 3).
        noise, solver, rtol, atol, adjoint, eval_trace, kinetic_energy, ...: the solver options of
            :func:`ffjord`, shared by every block.

    Example::

        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> flow = ffjord_multiscale((1, 4, 4), levels=1, blocks_per_scale=1, hidden_channels=[4], trace="exact",
        ...                          zero_init=False, rtol=1e-7, atol=1e-7)
        >>> sum(isinstance(m, FFJORD) for m in flow.modules())  # 1 block, squeeze, 1 block, factor out; 1 block
        3
        >>> x = torch.randn(2, 1, 4, 4)
        >>> y, log_det = flow.forward_and_log_det(x)
        >>> x_back, log_det_back = flow.inverse_and_log_det(y)
        >>> bool(torch.allclose(x_back, x, atol=1e-4)), bool(torch.allclose(log_det_back, log_det, atol=1e-4))
        (True, True)
        >>> ffjord_multiscale((1, 6, 6), levels=2)
        Traceback (most recent call last):
        ...
        ValueError: ffjord_multiscale: input_shape (1, 6, 6) does not fit levels = 2: ...

    Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
    Generative Models", ICLR 2019, section 4.2 and appendix; Dinh et al., "Density
    estimation using Real NVP", ICLR 2017 (the multiscale architecture).
    """
    shape = check_image_shape(input_shape)
    levels, named = resolve_levels("ffjord_multiscale", levels, num_scales, 1)
    check_positive_int(blocks_per_scale, "blocks_per_scale")
    if isinstance(hidden_channels, bool):
        raise ValueError(f"hidden_channels: expected a positive int or a list of them, got {hidden_channels!r}")
    hidden = [hidden_channels] * 3 if isinstance(hidden_channels, int) else list(hidden_channels)
    check_squeezable(shape, levels, "ffjord_multiscale", named)
    rest, ode_options = split_solver_options(dict(options), MultiscaleFFJORDOptions)
    warn_num_scales("ffjord_multiscale", num_scales)
    t1, train_t1 = rest.get("t1", 1.0), rest.get("train_t1", False)
    activation, zero_init, kernel = (
        rest.get("activation", "softplus"),
        rest.get("zero_init", True),
        rest.get("kernel_size", 3),
    )

    def blocks(s: tuple[int, int, int], level: int = 0) -> list[FFJORD]:
        return [
            FFJORD(ConvODENet(s, hidden, 0, activation, zero_init, kernel), t1, train_t1, ode_options)
            for _ in range(blocks_per_scale)
        ]

    return multiscale(shape, levels, before=blocks, after=blocks, final=blocks)
