"""Neural spline flows: autoregressive and coupling layers whose element-wise map is a rational-quadratic spline.

A neural spline flow (NSF) is an autoregressive or a coupling flow whose element-wise map
is the monotonic rational-quadratic spline
(:class:`~pyro_nf.transforms.rational_quadratic.RationalQuadraticSpline`): on ``[-B, B]``
``K`` bins, each a ratio of two quadratics, with knots, heights and interior derivatives
from ``3K - 1`` raw network outputs per element; outside, the identity. For element ``i``
with raw parameters ``theta_i`` from the network, the layers that train on the density of
data (the MAF direction, ``theta_i = theta_i(x_<i)``, and the couplings,
``theta_i = theta_i(x_a)`` for the moved half ``x_b``) map data to noise by the spline in
closed form, as in the paper; the IAF direction (``theta_i = theta_i(z_<i)``) maps noise to
data by it:

.. math::

    z_i = g(x_i; \\theta_i) \\ \text{(MAF, coupling)}, \\qquad
    x_i = g(z_i; \\theta_i) \\ \text{(IAF)}, \\qquad
    \\log|\\det \\partial z / \\partial x| = \\textstyle\\sum_i \\log g'(x_i; \\theta_i) \\ \text{(MAF)}.

The other direction of each solves the bin's quadratic (its stable root); the
closed form and the root are equally exact, but the direction decides which family of
functions the network parametrises, and the closed form on the side that is trained is the
one measured to fit as well as zuko's NSF (``docs/families/splines.md``). The skeletons are the
affine flows' (:mod:`pyro_nf.transforms.autoregressive`, :mod:`pyro_nf.transforms.coupling`):
only the map differs, so every option of MAF, IAF and RealNVP works here too, and the
sequential direction of the autoregressive layers runs through the MADE's incremental
pass (:meth:`pyro_nf.nn.MADE.sequential`).

Which to pick:

- ``nsf(D)`` (autoregressive, ``parallel="inverse"``): the density of data in one pass
  per layer, sampling sequential in ``D``. The most expressive per layer; the density model.
- ``nsf(D, parallel="forward")``: sampling and the density of its own samples in one pass,
  the density of arbitrary data sequential. A guide (variational posterior).
- ``nsf(D, coupling=True)``: both directions in one pass; each layer moves half the entries,
  so it takes more layers for the same fit.

The spline acts on ``[-B, B]`` only (``bound``, default 5): standardise the data (the
command line does), or give a wider ``bound``.

Durkan, Bekasov, Murray, Papamakarios, "Neural Spline Flows", NeurIPS 2019.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from pyro_nf.checks import check_choice, check_options, check_positive_int
from pyro_nf.conditional import ConditionalFlowStack
from pyro_nf.core import FlowStack
from pyro_nf.nn.made import MADE, Order, SequentialMethod
from pyro_nf.nn.nets import MLP, default_hidden_dims
from pyro_nf.transforms.autoregressive import (
    PARALLEL,
    Autoregressive,
    AutoregressiveOptions,
    ConditionalAutoregressive,
    Parallel,
    autoregressive_stack,
)
from pyro_nf.transforms.coupling import (
    ConditionalCoupling,
    Coupling,
    CouplingOptions,
    CouplingSplit,
    Mask,
    coupling_mask,
    coupling_stack,
)
from pyro_nf.transforms.rational_quadratic import (
    DEFAULT_BINS,
    DEFAULT_BOUND,
    RationalQuadraticSpline,
    SplineOptions,
    spline_map,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["nsf", "conditional_nsf", "spline_autoregressive", "spline_coupling"]  # the factories first
__all__ += ["SplineAutoregressive", "ConditionalSplineAutoregressive", "SplineCoupling", "ConditionalSplineCoupling"]
__all__ += ["NSFOptions"]


class SplineAutoregressive(Autoregressive):
    """One learnable autoregressive spline layer: :class:`~pyro_nf.transforms.autoregressive.Autoregressive`
    with a :class:`~pyro_nf.transforms.rational_quadratic.RationalQuadraticSpline`.

    ``z_i = g(x_i; theta_i(x_<i))`` with ``parallel="inverse"`` (density in one pass, a MAF
    layer: the spline in closed form from data to noise), ``x_i = g(z_i; theta_i(z_<i))`` with
    ``parallel="forward"`` (sampling in one pass, an IAF layer); the MADE gives ``3K - 1`` raw
    parameters per input.

    Args:
        made: a :class:`~pyro_nf.nn.MADE` with ``num_params = 3 bins - 1``.
        parallel: ``"inverse"`` or ``"forward"``, the direction that costs one MADE pass.
        bins, bound: the spline's ``K`` bins on ``[-bound, bound]`` (identity outside).
        cache_size: 1 to keep the last pair computed, or 0.
        sequential: ``"incremental"`` (default) or ``"reference"``, how the other direction is solved.

    Example::

        >>> import torch
        >>> layer = SplineAutoregressive(MADE(3, [16], num_params=23))
        >>> z, log_det = layer.inverse_and_log_det(torch.randn(4, 3))
        >>> log_det.abs().max().item() < 1e-6  # the MADE starts at zero: the identity, up to rounding
        True
    """

    def __init__(
        self,
        made: MADE,
        parallel: Parallel = "inverse",
        cache_size: int = 1,
        sequential: SequentialMethod = "incremental",
        *,
        bins: int = DEFAULT_BINS,
        bound: float = DEFAULT_BOUND,
    ) -> None:
        g = RationalQuadraticSpline(bins, bound, inverted=parallel == "inverse")
        super().__init__(made, g, parallel, cache_size, sequential)


class ConditionalSplineAutoregressive(ConditionalAutoregressive):
    """An autoregressive spline layer whose MADE also reads a context; ``.condition(context)`` gives the layer.

    Example::

        >>> import torch
        >>> layer = ConditionalSplineAutoregressive(MADE(3, [16], num_params=23, context_dim=2))
        >>> layer.condition(torch.randn(2))(torch.randn(4, 3)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        made: MADE,
        parallel: Parallel = "inverse",
        sequential: SequentialMethod = "incremental",
        *,
        bins: int = DEFAULT_BINS,
        bound: float = DEFAULT_BOUND,
    ) -> None:
        g = RationalQuadraticSpline(bins, bound, inverted=parallel == "inverse")
        super().__init__(made, g, parallel, sequential)


class SplineCoupling(Coupling):
    """A learnable coupling layer with a rational-quadratic spline, keeping the entries where ``kept`` is True.

    ``y_a = x_a``, ``x_b = g(y_b; theta(x_a))`` (the spline in closed form from data ``y`` to
    noise ``x``, as in the paper; the root from noise to data): the network maps the kept entries to
    ``3K - 1`` raw parameters per moved entry (laid out in ``3K - 1`` blocks of the moved size).

    Example::

        >>> import torch
        >>> layer = SplineCoupling(MLP(2, [16], 23 * 2), coupling_mask(4, 0))
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(layer(x), x, atol=1e-6)  # the network starts at zero: the identity, up to rounding
        True
    """

    def __init__(
        self,
        net: nn.Module,
        kept: Tensor,
        cache_size: int = 1,
        *,
        bins: int = DEFAULT_BINS,
        bound: float = DEFAULT_BOUND,
    ) -> None:
        super().__init__(net, CouplingSplit(kept), RationalQuadraticSpline(bins, bound, inverted=True), cache_size)


class ConditionalSplineCoupling(ConditionalCoupling):
    """A spline coupling layer whose network also reads a context; ``.condition(context)`` gives the layer.

    Example::

        >>> import torch
        >>> layer = ConditionalSplineCoupling(MLP(2, [16], 23 * 2, context_dim=5), coupling_mask(4, 0))
        >>> layer.condition(torch.randn(3, 5))(torch.randn(3, 4)).shape
        torch.Size([3, 4])
    """

    def __init__(self, net: MLP, kept: Tensor, *, bins: int = DEFAULT_BINS, bound: float = DEFAULT_BOUND) -> None:
        g = RationalQuadraticSpline(bins, bound, inverted=True)
        super().__init__(net, CouplingSplit(kept), g, net.context_dim)


def spline_autoregressive(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    parallel: Parallel = "inverse",
    order: Order = "natural",
    residual: bool = False,
    activation: Callable[[], nn.Module] = nn.ReLU,
    bins: int = DEFAULT_BINS,
    bound: float = DEFAULT_BOUND,
    sequential: SequentialMethod = "incremental",
) -> SplineAutoregressive:
    """One :class:`SplineAutoregressive` layer with its MADE built to fit.

    Example::

        >>> import torch
        >>> spline_autoregressive(3, [16], parallel="forward", bins=4)(torch.randn(2, 3)).shape
        torch.Size([2, 3])
    """
    g = RationalQuadraticSpline(bins, bound)
    hidden = list(hidden_dims) if hidden_dims is not None else default_hidden_dims(input_dim)
    made = MADE(input_dim, hidden, g.num_params, 0, order, residual, activation)
    return SplineAutoregressive(made, parallel, sequential=sequential, bins=bins, bound=bound)


def spline_coupling(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    layer: int = 0,
    mask: Mask = "half",
    activation: Callable[[], nn.Module] = nn.ReLU,
    bins: int = DEFAULT_BINS,
    bound: float = DEFAULT_BOUND,
) -> SplineCoupling:
    """One :class:`SplineCoupling` over ``(input_dim,)`` with its network built to fit (``layer`` picks the mask).

    Example::

        >>> import torch
        >>> spline_coupling(4, [16], layer=1)(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """
    g = RationalQuadraticSpline(bins, bound)
    kept = coupling_mask(input_dim, layer, mask)
    num_kept = int(kept.sum())
    hidden = list(hidden_dims) if hidden_dims is not None else default_hidden_dims(input_dim)
    net = MLP(num_kept, hidden, g.num_params * (input_dim - num_kept), 0, activation)
    return SplineCoupling(net, kept, bins=bins, bound=bound)


class NSFOptions(AutoregressiveOptions, CouplingOptions, SplineOptions, total=False):
    """Keyword options of :func:`nsf` and :func:`conditional_nsf`."""

    coupling: bool
    parallel: Parallel


_COUPLING_KEYS = frozenset(CouplingOptions.__optional_keys__)
_AUTOREGRESSIVE_KEYS = frozenset(AutoregressiveOptions.__optional_keys__) | {"parallel"}


def _nsf_stack(
    factory: str,
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None,
    num_transforms: int,
    options: NSFOptions,
) -> list[nn.Module]:
    check_options(factory, options, NSFOptions)
    coupling = options.get("coupling", False)
    if not isinstance(coupling, bool):
        raise TypeError(f"{factory}: coupling: expected True or False, got {coupling!r}")
    g, rest = spline_map(options, inverted=coupling or options.get("parallel", "inverse") == "inverse")
    rest.pop("coupling", None)
    misplaced = sorted(set(rest) - (_COUPLING_KEYS if coupling else _AUTOREGRESSIVE_KEYS))
    if misplaced:
        layers = "coupling" if coupling else "autoregressive"
        raise TypeError(
            f"{factory}: option(s) {misplaced} do not apply to {layers} layers (coupling={coupling}); "
            f"they apply with coupling={not coupling}"
        )
    if coupling:
        return coupling_stack(input_dim, context_dim, hidden_dims, num_transforms, g, **rest)
    parallel: Any = rest.pop("parallel", "inverse")
    check_choice(parallel, PARALLEL, "parallel")
    return autoregressive_stack(input_dim, context_dim, parallel, hidden_dims, num_transforms, g, **rest)


def nsf(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int = 5,
    **options: Unpack[NSFOptions],
) -> FlowStack:
    """A neural spline flow: ``num_transforms`` rational-quadratic spline layers, one :class:`FlowStack`.

    Autoregressive layers by default, in the MAF direction: ``log_prob`` of any data costs one
    MADE pass per layer, sampling is sequential in ``D`` (with the default
    ``sequential="incremental"``, the arithmetic of one pass plus ``D`` small steps). With
    ``parallel="forward"`` the layers take the IAF direction (sampling in one pass, the
    density of arbitrary data sequential); with ``coupling=True`` they are coupling layers
    (both directions in one pass).

    Args:
        input_dim: the event size D.
        hidden_dims: hidden widths of each network (default ``[max(64, 4 D)] * 2``).
        num_transforms: number of spline layers.
        bins: the number ``K >= 2`` of bins of each spline (default 8); ``3K - 1`` network outputs
            per element.
        bound: the spline acts on ``[-bound, bound]`` and is the identity outside (default 5).
        coupling: coupling layers instead of autoregressive ones (default False).
        parallel: autoregressive layers only: ``"inverse"`` (default; density in one pass, a MAF)
            or ``"forward"`` (sampling in one pass, an IAF).
        permutation, residual, seed, sequential: autoregressive layers only, as in
            :func:`~pyro_nf.transforms.maf`.
        mask: coupling layers only: ``"half"`` (default) or ``"alternate"``, as in
            :func:`~pyro_nf.transforms.realnvp`.
        batch_norm, activation, actnorm: as in :func:`~pyro_nf.transforms.maf`.

    Example::

        >>> import torch
        >>> import pyro.distributions as dist
        >>> flow = nsf(2, hidden_dims=[32, 32], num_transforms=2)
        >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
        >>> d.log_prob(torch.randn(7, 2)).shape
        torch.Size([7])
        >>> nsf(2, coupling=True).parallel, nsf(2, parallel="forward").parallel
        ('both', 'forward')

    Durkan et al., "Neural Spline Flows", NeurIPS 2019.
    """
    return FlowStack(_nsf_stack("nsf", input_dim, 0, hidden_dims, num_transforms, options))  # type: ignore[arg-type]


def conditional_nsf(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int = 5,
    **options: Unpack[NSFOptions],
) -> ConditionalFlowStack:
    """A neural spline flow whose every network reads a context; ``.condition(context)`` gives a :class:`FlowStack`.

    Same options as :func:`nsf`. With ``parallel="forward"`` it is an amortized posterior in
    the manner of a conditional IAF.

    Example::

        >>> import torch
        >>> flow = conditional_nsf(2, 3, hidden_dims=[16], parallel="forward")
        >>> flow.condition(torch.randn(5, 3))(torch.randn(5, 2)).shape
        torch.Size([5, 2])
    """
    check_positive_int(context_dim, "context_dim")
    parts = _nsf_stack("conditional_nsf", input_dim, context_dim, hidden_dims, num_transforms, options)
    return ConditionalFlowStack(parts)  # type: ignore[arg-type]
