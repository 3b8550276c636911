"""The same flows built in pyro_nf and in the libraries it is measured against.

Every builder returns a :class:`Model`: the ``nn.Module`` that owns all the
parameters, a ``log_prob(x)`` of data, and a ``sample(n)``. Each flow has
``num_transforms`` layers whose networks have the hidden widths
``hidden_dims`` (default ``[256, 256]``), a standard Normal base, and, for the
autoregressive flows, the input order reversed between layers. What differs
between libraries is what each library does by default: its scale map, its
initialisation, its coupling mask.

Directions, in pyro_nf's naming (forward maps base noise to data):

- **MAF**: density of data is one network pass per layer, sampling is
  sequential (D passes).
- **IAF**: sampling is one pass per layer, density of arbitrary data is
  sequential.
- **RealNVP**: both directions are one pass.

How each library's classes map onto these names is written next to each
builder; a mapping was checked by reading the library's source, and
:func:`check_directions` re-checks it by counting network calls.

The neural spline flows (:data:`SPLINE_FLOWS`, rational-quadratic splines of 8 bins on
``[-5, 5]``, identity outside) are built in the libraries that have them
(:data:`SPLINE_LIBRARIES`): ``"NSF"`` autoregressive in the MAF direction, ``"NSF-IAF"`` in
the IAF direction, ``"NSF-coupling"`` coupling layers.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

LIBRARIES: tuple[str, ...] = ("pyro_nf", "zuko", "nflows", "normflows", "pyro")
FLOWS: tuple[str, ...] = ("MAF", "IAF", "RealNVP")
SPLINE_LIBRARIES: tuple[str, ...] = ("pyro_nf", "zuko", "pyro")
SPLINE_FLOWS: tuple[str, ...] = ("NSF", "NSF-IAF", "NSF-coupling")
SPLINE_BINS, SPLINE_BOUND = 8, 5.0


@dataclass
class Model:
    """One flow of one library behind a common interface."""

    library: str
    flow: str
    dim: int
    module: nn.Module
    log_prob: Callable[[Tensor], Tensor]
    sample: Callable[[int], Tensor]
    density_parallel: bool
    sampling_parallel: bool
    sampling_passes: int = 1  # network passes of a parallel sampling direction (zuko's coupling: 2)


def _mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int) -> nn.Sequential:
    dims = [in_dim, *hidden_dims]
    layers: list[nn.Module] = []
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


# -- pyro_nf -------------------------------------------------------------------------------------------------
def _pyro_nf(flow: str, dim: int, hidden_dims: Sequence[int], num_transforms: int) -> Model:
    from pyro_nf import FlowModel
    from pyro_nf.transforms import iaf, maf, realnvp

    # maf: parallel="inverse" (data -> noise in one MADE pass); iaf: parallel="forward";
    # realnvp: affine couplings with contiguous-half masks alternating between layers.
    factory = {"MAF": maf, "IAF": iaf, "RealNVP": realnvp}[flow]
    model = FlowModel(factory(dim, list(hidden_dims), num_transforms), (dim,))
    return Model(
        "pyro_nf",
        flow,
        dim,
        model,
        model.log_prob,
        lambda n: model.sample((n,)),
        flow != "IAF",
        flow != "MAF",
    )


# -- zuko 1.6 ------------------------------------------------------------------------------------------------
def _zuko(flow: str, dim: int, hidden_dims: Sequence[int], num_transforms: int) -> Model:
    import zuko
    from zuko.distributions import DiagNormal
    from zuko.flows import Flow, LazyInverse, MaskedAutoregressiveTransform, UnconditionalDistribution

    # zuko's transforms map data -> noise. MaskedAutoregressiveTransform computes that direction with one
    # MaskedMLP pass and its inverse with D passes, so zuko.flows.MAF is a MAF. Wrapping each layer in
    # LazyInverse swaps the directions: sampling is one pass, density D passes, which is an IAF.
    # zuko.flows.RealNVP: affine couplings with alternating checkered masks.
    kwargs = {"hidden_features": list(hidden_dims)}
    if flow == "MAF":
        model: nn.Module = zuko.flows.MAF(dim, transforms=num_transforms, **kwargs)
    elif flow == "IAF":
        orders = [torch.arange(dim), torch.arange(dim).flip(0)]
        layers = [
            LazyInverse(MaskedAutoregressiveTransform(dim, order=orders[i % 2], **kwargs))
            for i in range(num_transforms)
        ]
        base = UnconditionalDistribution(DiagNormal, torch.zeros(dim), torch.ones(dim), buffer=True)
        model = Flow(layers, base)
    else:
        model = zuko.flows.RealNVP(dim, transforms=num_transforms, **kwargs)
    return Model(
        "zuko",
        flow,
        dim,
        model,
        lambda x: model().log_prob(x),
        lambda n: model().sample((n,)),
        flow != "IAF",
        flow != "MAF",
    )


# -- nflows 0.14 ---------------------------------------------------------------------------------------------
class _NflowsNet(nn.Module):
    """A plain MLP with the ``(inputs, context)`` signature nflows' couplings call."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dims: Sequence[int]) -> None:
        super().__init__()
        self.net = _mlp(in_dim, hidden_dims, out_dim)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        return self.net(inputs)


def _nflows(flow: str, dim: int, hidden_dims: Sequence[int], num_transforms: int) -> Model:
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import (
        AffineCouplingTransform,
        CompositeTransform,
        InverseTransform,
        MaskedAffineAutoregressiveTransform,
        ReversePermutation,
    )

    # nflows' transforms map data -> noise. MaskedAffineAutoregressiveTransform does that direction with one
    # MADE pass (its inverse loops D times): a MAF. InverseTransform(...) of it samples in one pass and
    # needs D passes for density: an IAF. A MADE of hidden widths [h, h] is nflows' MADE with
    # num_blocks=1 (input layer, one h -> h block, output layer) and no residual blocks.
    # RealNVP: AffineCouplingTransform with a plain MLP conditioner and alternating checkered masks.
    if len(set(hidden_dims)) != 1:
        raise ValueError(f"nflows' MADE needs equal hidden widths, got {list(hidden_dims)}")
    parts: list[nn.Module] = []
    for i in range(num_transforms):
        if i > 0:
            parts.append(ReversePermutation(dim))
        if flow == "RealNVP":
            mask = (torch.arange(dim) + i) % 2
            parts.append(
                AffineCouplingTransform(mask, lambda a, b: _NflowsNet(a, b, hidden_dims))  # noqa: B023
            )
        else:
            made = MaskedAffineAutoregressiveTransform(
                dim, hidden_dims[0], num_blocks=len(hidden_dims) - 1, use_residual_blocks=False
            )
            parts.append(made if flow == "MAF" else InverseTransform(made))
    model = Flow(CompositeTransform(parts), StandardNormal([dim]))
    return Model(
        "nflows",
        flow,
        dim,
        model,
        model.log_prob,
        model.sample,
        flow != "IAF",
        flow != "MAF",
    )


# -- normflows 1.7.3 -----------------------------------------------------------------------------------------
def _normflows(flow: str, dim: int, hidden_dims: Sequence[int], num_transforms: int) -> Model:
    import normflows as nf

    # normflows' layers map base -> data in forward(), and log_prob runs inverse(). Its
    # MaskedAffineAutoregressive (documented as MAF) runs the MADE once in forward() and D times in
    # inverse(): sequential for density, i.e. an IAF in our naming. nf.flows.Reverse(...) of it swaps the
    # two, giving a MAF. RealNVP: AffineCouplingBlock (split in halves, exp scale) with a zero-initialised
    # nf.nets.MLP, and a swap permutation between layers, as in normflows' RealNVP examples.
    if flow != "RealNVP" and len(set(hidden_dims)) != 1:
        raise ValueError(f"normflows' MADE needs equal hidden widths, got {list(hidden_dims)}")
    flows: list[nn.Module] = []
    for i in range(num_transforms):
        if i > 0:
            flows.append(nf.flows.Permute(dim, mode="swap"))
        if flow == "RealNVP":
            half = math.ceil(dim / 2)
            net = nf.nets.MLP([half, *hidden_dims, 2 * (dim - half)], init_zeros=True)
            flows.append(nf.flows.AffineCouplingBlock(net))
        else:
            made = nf.flows.MaskedAffineAutoregressive(
                dim, hidden_dims[0], num_blocks=len(hidden_dims) - 1, use_residual_blocks=False
            )
            flows.append(nf.flows.Reverse(made) if flow == "MAF" else made)
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), flows)
    return Model(
        "normflows",
        flow,
        dim,
        model,
        model.log_prob,
        lambda n: model.sample(n)[0],
        flow != "IAF",
        flow != "MAF",
    )


# -- Pyro 1.9 built-ins --------------------------------------------------------------------------------------
def _pyro(flow: str, dim: int, hidden_dims: Sequence[int], num_transforms: int) -> Model:
    from pyro.distributions.transforms import AffineAutoregressive, AffineCoupling, Permute
    from pyro.nn import AutoRegressiveNN, DenseNN

    # Pyro's transforms map base -> data. AffineAutoregressive computes forward with one
    # AutoRegressiveNN pass and _inverse with D passes: an IAF. Its .inv is used as a MAF (density in one
    # pass, sampling sequential); .inv hides the parameters from parameters(), so the modules are kept
    # in a ModuleList. RealNVP: AffineCoupling (first floor(D/2) entries kept) with a DenseNN conditioner
    # and a reversing Permute between layers.
    modules = nn.ModuleList()
    transforms: list = []
    reverse = torch.arange(dim).flip(0)
    for i in range(num_transforms):
        if flow == "RealNVP":
            if i > 0:
                transforms.append(Permute(reverse))
            split = dim // 2
            layer = AffineCoupling(split, DenseNN(split, list(hidden_dims), [dim - split, dim - split]))
            modules.append(layer)
            transforms.append(layer)
        else:
            order = torch.arange(dim) if i % 2 == 0 else reverse
            layer = AffineAutoregressive(AutoRegressiveNN(dim, list(hidden_dims), permutation=order))
            modules.append(layer)
            transforms.append(layer.inv if flow == "MAF" else layer)
    if flow == "MAF":
        transforms.reverse()  # the inverse of a stack runs its layers in reverse order
    return _pyro_model(flow, dim, modules, transforms, flow != "IAF", flow != "MAF")


def _pyro_model(
    flow: str, dim: int, modules: nn.ModuleList, transforms: list, density_parallel: bool, sampling_parallel: bool
) -> Model:
    """Pyro's transforms over a standard Normal base, behind the common interface."""
    import pyro.distributions as dist

    def distribution() -> dist.TransformedDistribution:
        zeros = next(modules.parameters()).new_zeros(dim)  # the base follows the modules' device and dtype
        return dist.TransformedDistribution(dist.Normal(zeros, 1.0).to_event(1), transforms)

    return Model(
        "pyro",
        flow,
        dim,
        modules,
        lambda x: distribution().log_prob(x),
        lambda n: distribution().sample((n,)),
        density_parallel,
        sampling_parallel,
    )


# -- neural spline flows ---------------------------------------------------------------------------------------
def _pyro_nf_spline(flow: str, dim: int, hidden_dims: Sequence[int], num_transforms: int) -> Model:
    from pyro_nf import FlowModel
    from pyro_nf.transforms import nsf

    # nsf: autoregressive, parallel="inverse" (density in one MADE pass); parallel="forward" the IAF direction;
    # coupling=True: spline couplings with contiguous-half masks alternating between layers.
    options = {"NSF": {}, "NSF-IAF": {"parallel": "forward"}, "NSF-coupling": {"coupling": True}}[flow]
    spline = {"bins": SPLINE_BINS, "bound": SPLINE_BOUND}
    model = FlowModel(nsf(dim, list(hidden_dims), num_transforms, **spline, **options), (dim,))  # type: ignore[arg-type]
    return Model(
        "pyro_nf", flow, dim, model, model.log_prob, lambda n: model.sample((n,)), flow != "NSF-IAF", flow != "NSF"
    )


def _zuko_spline(flow: str, dim: int, hidden_dims: Sequence[int], num_transforms: int) -> Model:
    import zuko
    from zuko.distributions import DiagNormal
    from zuko.flows import Flow, LazyInverse, MaskedAutoregressiveTransform, UnconditionalDistribution
    from zuko.transforms import MonotonicRQSTransform

    # zuko.flows.NSF is its MAF with MonotonicRQSTransform (bound 5): density in one MaskedMLP pass, sampling
    # D passes (D + 1 for the log-det). passes=2 makes it a coupling flow: the first half of the order gets
    # an unconditioned spline, the second half a spline conditioned on the first; sampling then costs two
    # passes. The IAF direction is LazyInverse of each layer, as for the affine IAF.
    kwargs = {"hidden_features": list(hidden_dims), "bins": SPLINE_BINS}
    if flow == "NSF":
        model: nn.Module = zuko.flows.NSF(dim, transforms=num_transforms, **kwargs)
    elif flow == "NSF-coupling":
        model = zuko.flows.NSF(dim, transforms=num_transforms, passes=2, **kwargs)
    else:
        orders = [torch.arange(dim), torch.arange(dim).flip(0)]
        shapes = [(SPLINE_BINS,), (SPLINE_BINS,), (SPLINE_BINS - 1,)]
        layers = [
            LazyInverse(
                MaskedAutoregressiveTransform(
                    dim,
                    order=orders[i % 2],
                    univariate=MonotonicRQSTransform,
                    shapes=shapes,
                    hidden_features=list(hidden_dims),
                )
            )
            for i in range(num_transforms)
        ]
        base = UnconditionalDistribution(DiagNormal, torch.zeros(dim), torch.ones(dim), buffer=True)
        model = Flow(layers, base)
    return Model(
        "zuko",
        flow,
        dim,
        model,
        lambda x: model().log_prob(x),
        lambda n: model().sample((n,)),
        flow != "NSF-IAF",
        flow != "NSF",
        sampling_passes=2 if flow == "NSF-coupling" and dim > 1 else 1,
    )


def _pyro_spline(flow: str, dim: int, hidden_dims: Sequence[int], num_transforms: int) -> Model:
    from pyro.distributions.transforms import Permute, SplineAutoregressive, SplineCoupling
    from pyro.nn import AutoRegressiveNN, DenseNN

    # Pyro's spline transforms map base -> data with order="quadratic" (the rational-quadratic spline; its
    # default "linear" is a rational-linear one). SplineAutoregressive computes forward with one
    # AutoRegressiveNN pass and _inverse with D passes: an IAF; its .inv is the MAF, as for the affine flows.
    # SplineCoupling keeps the first floor(D/2) entries (and puts an unconditioned spline on them) with a
    # DenseNN conditioner; a reversing Permute goes between layers. The networks emit the three parameter
    # groups of order="quadratic" (widths, heights, interior derivatives).
    k, bound = SPLINE_BINS, SPLINE_BOUND
    modules = nn.ModuleList()
    transforms: list = []
    reverse = torch.arange(dim).flip(0)
    for i in range(num_transforms):
        if flow == "NSF-coupling":
            if i > 0:
                transforms.append(Permute(reverse))
            split = dim // 2
            moved = dim - split
            net = DenseNN(split, list(hidden_dims), [moved * k, moved * k, moved * (k - 1)])
            layer = SplineCoupling(dim, split, net, count_bins=k, bound=bound, order="quadratic")
            modules.append(layer)
            transforms.append(layer)
        else:
            order = torch.arange(dim) if i % 2 == 0 else reverse
            arn = AutoRegressiveNN(dim, list(hidden_dims), param_dims=[k, k, k - 1], permutation=order)
            layer = SplineAutoregressive(dim, arn, count_bins=k, bound=bound, order="quadratic")
            modules.append(layer)
            transforms.append(layer.inv if flow == "NSF" else layer)
    if flow == "NSF":
        transforms.reverse()  # the inverse of a stack runs its layers in reverse order
    return _pyro_model(flow, dim, modules, transforms, flow != "NSF-IAF", flow != "NSF")


_BUILDERS = {"pyro_nf": _pyro_nf, "zuko": _zuko, "nflows": _nflows, "normflows": _normflows, "pyro": _pyro}
_SPLINE_BUILDERS = {"pyro_nf": _pyro_nf_spline, "zuko": _zuko_spline, "pyro": _pyro_spline}


def build(
    library: str,
    flow: str,
    dim: int,
    *,
    hidden_dims: Sequence[int] = (256, 256),
    num_transforms: int = 5,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Model:
    """Build ``flow`` (of :data:`FLOWS` or :data:`SPLINE_FLOWS`) over ``dim`` inputs in ``library``, on ``device``."""
    builders = _SPLINE_BUILDERS if flow in SPLINE_FLOWS else _BUILDERS
    if flow not in FLOWS + SPLINE_FLOWS:
        raise ValueError(f"flow: expected one of {FLOWS + SPLINE_FLOWS}, got {flow!r}")
    if library not in builders:
        raise ValueError(f"library: expected one of {tuple(builders)} for {flow}, got {library!r}")
    torch.manual_seed(seed)
    model = builders[library](flow, dim, tuple(hidden_dims), num_transforms)
    model.module.to(device)
    return model


def _count_linear_calls(module: nn.Module, fn: Callable[[], object]) -> int:
    """How many times ``fn`` runs the first linear layer of the first network of ``module``."""
    first = next(m for m in module.modules() if type(m).__name__.endswith("Linear"))
    calls = 0

    def hook(*_: object) -> None:
        nonlocal calls
        calls += 1

    handle = first.register_forward_hook(hook)
    try:
        with torch.no_grad():
            fn()
    finally:
        handle.remove()
    return calls


def check_directions(model: Model) -> None:
    """Raise ``AssertionError`` if a model's cheap directions are not the ones its flow name promises.

    Counts the calls of the first layer's first linear map during ``log_prob`` and ``sample``: one call
    means that direction is parallel (``model.sampling_passes`` calls for a parallel sampling that takes a
    fixed number of passes, zuko's coupling); a sequential direction makes ``D`` or more full passes (zuko
    adds one for the log-det), or none at all where the solver works on slices of the weights (pyro_nf's
    incremental MADE solve). Needs ``model.dim >= 2``.
    """
    x = torch.randn(3, model.dim)
    calls = {
        "density": (_count_linear_calls(model.module, lambda: model.log_prob(x)), model.density_parallel, 1),
        "sampling": (
            _count_linear_calls(model.module, lambda: model.sample(3)),
            model.sampling_parallel,
            model.sampling_passes,
        ),
    }
    for direction, (count, parallel, passes) in calls.items():
        if (count == passes) != parallel or (not parallel and 0 < count < model.dim):
            expected = "1 pass" if parallel else f"at least {model.dim} passes"
            raise AssertionError(f"{model.library} {model.flow} {direction}: expected {expected}, got {count}")


def interleaved_median_seconds(calls: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of each call, the calls taking turns within every repeat (so load hits all alike)."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
