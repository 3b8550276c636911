"""The one registry of flows by name: what ``pyro-nf train --flow``, the training configuration and ``AutoFlow`` build.

Every entry is a :class:`FlowSpec`: the kind of data it models (vectors or images), a
one-line summary, and how to build it. Vector flows are built with
``spec.build(input_dim, hidden_dims=..., num_transforms=..., context_dim=..., **options)``
(a conditional flow when ``context_dim > 0``); image flows with
``spec.build(input_shape, levels=..., hidden_channels=..., depth=..., coupling=...)`` (for
``ffjord-multiscale``, ``depth`` is the number of CNF blocks before and after each squeeze and
``coupling`` does not apply). A new
family plugs in with one :class:`FlowSpec` in :data:`FLOWS`.

Example::

    >>> import torch
    >>> FLOWS["maf"].build(3, hidden_dims=[8], num_transforms=2)(torch.randn(4, 3)).shape
    torch.Size([4, 3])
    >>> sorted(name for name, spec in FLOWS.items() if spec.kind == "image")
    ['ffjord-multiscale', 'glow', 'realnvp-multiscale']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from torch.distributions import Transform

from pyro_nf.checks import check_choice, check_positive_int
from pyro_nf.conditional import ConditionalFlowStack
from pyro_nf.core import FlowStack
from pyro_nf.transforms import (
    conditional_ffjord,
    conditional_iaf,
    conditional_maf,
    conditional_nsf,
    conditional_realnvp,
    ffjord,
    ffjord_multiscale,
    glow,
    iaf,
    maf,
    nsf,
    realnvp,
    realnvp_multiscale,
)

__all__ = ["FLOWS", "FlowSpec", "flow_factory", "flow_spec"]

Kind = Literal["vector", "image"]


@dataclass(frozen=True)
class FlowSpec:
    """How one flow family is built by name.

    ``name`` is what users type (``--flow``, ``AutoFlow(model, flow=...)``); ``kind`` is
    ``"vector"`` (event shape ``(D,)``) or ``"image"`` (``(C, H, W)``); ``summary`` is the line
    of ``pyro-nf list``; ``factory`` and ``conditional`` are the unconditional and the
    conditional factory (``.condition(context)``, or None); ``stacks`` says whether the factory
    builds a stack itself (takes ``num_transforms``): FFJORD does not, so ``num_transforms > 1``
    stacks several CNFs, as in the FFJORD VAEs.
    """

    name: str
    kind: Kind
    summary: str
    factory: Callable[..., Any]
    conditional: Callable[..., Any] | None = None
    stacks: bool = True

    def build(self, shape: int | Sequence[int], **options: Any) -> Any:
        """The flow over ``shape`` (an ``input_dim`` for vector flows, ``(C, H, W)`` for image flows)."""
        if self.kind == "image":
            return self._build_image(shape, **options)  # type: ignore[arg-type]
        return self._build_vector(shape, **options)  # type: ignore[arg-type]

    def _build_vector(
        self,
        input_dim: int,
        *,
        hidden_dims: Sequence[int] | None = None,
        num_transforms: int | None = None,
        context_dim: int = 0,
        **options: Any,
    ) -> Transform:
        factory = self.factory
        args: tuple[Any, ...] = (input_dim,)
        if context_dim:
            if self.conditional is None:
                raise ValueError(f"flow {self.name!r} has no conditional form")
            factory, args = self.conditional, (input_dim, context_dim)
        if hidden_dims is not None:
            options["hidden_dims"] = list(hidden_dims)
        if self.stacks:
            if num_transforms is not None:
                options["num_transforms"] = num_transforms
            return factory(*args, **options)  # type: ignore[no-any-return]
        count = 1 if num_transforms is None else check_positive_int(num_transforms, "num_transforms")
        blocks = [factory(*args, **options) for _ in range(count)]
        if count == 1:
            return blocks[0]  # type: ignore[no-any-return]
        return ConditionalFlowStack(blocks) if context_dim else FlowStack(blocks)  # type: ignore[return-value]

    def _build_image(
        self,
        input_shape: Sequence[int],
        *,
        levels: int,
        hidden_channels: int,
        depth: int | None = None,
        coupling: str | None = "affine",
    ) -> Transform:
        if self.name == "ffjord-multiscale":
            if coupling not in (None, "affine"):
                raise ValueError(f"coupling: {self.name} has no coupling layers, got coupling={coupling!r}")
            return self.factory(  # type: ignore[no-any-return]
                input_shape, levels=levels, blocks_per_scale=depth or 2, hidden_channels=hidden_channels
            )
        if self.name == "glow":
            return self.factory(input_shape, levels, depth or 1, hidden_channels, coupling)  # type: ignore[no-any-return]
        return self.factory(  # type: ignore[no-any-return]
            input_shape, levels=levels, hidden_channels=hidden_channels, coupling=coupling
        )


FLOWS: dict[str, FlowSpec] = {
    spec.name: spec
    for spec in (
        FlowSpec("maf", "vector", "masked autoregressive flow (density in one pass)", maf, conditional_maf),
        FlowSpec("iaf", "vector", "inverse autoregressive flow (sampling in one pass)", iaf, conditional_iaf),
        FlowSpec("realnvp", "vector", "affine coupling flow for vectors", realnvp, conditional_realnvp),
        FlowSpec("nsf", "vector", "neural spline flow, autoregressive (density in one pass)", nsf, conditional_nsf),
        FlowSpec(
            "nsf-coupling",
            "vector",
            "neural spline flow, coupling layers (both directions in one pass)",
            partial(nsf, coupling=True),
            partial(conditional_nsf, coupling=True),
        ),
        FlowSpec("ffjord", "vector", "continuous normalizing flow (FFJORD)", ffjord, conditional_ffjord, stacks=False),
        FlowSpec("glow", "image", "Glow (actnorm, 1x1 conv, coupling)", glow),
        FlowSpec("realnvp-multiscale", "image", "multiscale RealNVP for images", realnvp_multiscale),
        FlowSpec("ffjord-multiscale", "image", "FFJORD's multiscale image CNF", ffjord_multiscale),
    )
}
"""Every flow that can be built by name."""


def flow_spec(name: object, kind: Kind | None = None, what: str = "flow") -> FlowSpec:
    """The :class:`FlowSpec` named ``name`` (of the given ``kind``); a ``ValueError`` listing the choices otherwise."""
    choices = [n for n, spec in FLOWS.items() if kind is None or spec.kind == kind]
    check_choice(name, choices, what)
    return FLOWS[name]  # type: ignore[index]


def flow_factory(flow: str, conditional: bool = False) -> Callable[..., Any]:
    """The factory of the vector flow named ``flow``, called as ``factory(input_dim[, context_dim], ...)``.

    With ``conditional=True`` the ``conditional_`` factory, whose result has ``.condition(context)``.
    Every factory takes ``hidden_dims`` and ``num_transforms`` (FFJORD stacks that many CNFs).

    Example::

        >>> flow_factory("maf").__name__, flow_factory("iaf", conditional=True).__name__
        ('maf', 'conditional_iaf')
    """
    spec = flow_spec(flow, "vector")
    factory = spec.conditional if conditional else spec.factory
    assert factory is not None  # every vector flow has a conditional form
    if spec.stacks:
        return factory

    def build(input_dim: int, *args: Any, **options: Any) -> Any:
        if conditional:
            (context_dim, *rest) = args
            return spec.build(input_dim, *rest, context_dim=context_dim, **options)
        return spec.build(input_dim, *args, **options)

    build.__name__ = factory.__name__
    build.__doc__ = factory.__doc__
    return build
