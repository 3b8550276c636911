"""The contract every pyro_nf transform meets: the cases and the helpers of the shared suite.

A transform family joins the suite by adding one :class:`Case` to ``CASES``;
``tests/test_contract.py`` runs every case through the same checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pyro.distributions.conditional import ConditionalTransform
from torch import Tensor, nn
from torch.distributions import Transform

from pyro_nf.core import InverseTransformModule
from pyro_nf.transforms import (
    batch_norm,
    conditional_iaf,
    conditional_maf,
    conditional_realnvp,
    iaf,
    maf,
    realnvp,
)

CONTEXT_DIM = 3


@dataclass(frozen=True)
class Case:
    """One transform under contract.

    ``make(shape)`` builds the transform (or, with ``context_dim``, the
    conditional transform) for an event shape. ``vector`` cases take any
    ``(D,)`` and also run the D = 1 and 2D-density checks. ``shape`` is the
    event shape used by the other checks.
    """

    name: str
    make: Callable[[tuple[int, ...]], Transform | ConditionalTransform]
    shape: tuple[int, ...] = (5,)
    context_dim: int = 0
    vector: bool = True
    autoregressive: bool = False
    marks: tuple[object, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        return self.name


def _d(shape: tuple[int, ...]) -> int:
    return shape[0]


CASES: list[Case] = [
    Case("maf", lambda s: maf(_d(s), [16, 16], 3), autoregressive=True),
    Case(
        "maf-random-residual-batchnorm",
        lambda s: maf(_d(s), [16, 16], 3, permutation="random", residual=True, batch_norm=True),
        autoregressive=True,
    ),
    Case("maf-gate", lambda s: maf(_d(s), [16], 2, scale="gate", permutation="none"), autoregressive=True),
    Case("iaf", lambda s: iaf(_d(s), [16, 16], 3), autoregressive=True),
    Case("realnvp", lambda s: realnvp(_d(s), [16, 16], 4)),
    Case("realnvp-alternate-batchnorm", lambda s: realnvp(_d(s), [16], 4, mask="alternate", batch_norm=True)),
    Case("batch_norm", lambda s: batch_norm(_d(s))),
    Case("inverse-maf", lambda s: InverseTransformModule(maf(_d(s), [16], 2))),
    Case("conditional_maf", lambda s: conditional_maf(_d(s), CONTEXT_DIM, [16, 16], 3), context_dim=CONTEXT_DIM),
    Case("conditional_iaf", lambda s: conditional_iaf(_d(s), CONTEXT_DIM, [16, 16], 3), context_dim=CONTEXT_DIM),
    Case(
        "conditional_realnvp",
        lambda s: conditional_realnvp(_d(s), CONTEXT_DIM, [16, 16], 4),
        context_dim=CONTEXT_DIM,
    ),
]


def perturb(module: nn.Module, std: float, seed: int = 0) -> None:
    """Move every parameter away from its (often identity) initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator).to(p))
        for m in module.modules():  # a batch norm with statistics that are not the identity
            if hasattr(m, "running_var"):
                m.running_mean.add_(0.3)
                m.running_var.mul_(1.5)


@dataclass
class Instance:
    """A built case: the module owning the parameters, the transform, and the context."""

    owner: nn.Module
    transform: Transform
    context: Tensor | None


def instantiate(
    case: Case,
    shape: tuple[int, ...] | None = None,
    *,
    batch: tuple[int, ...] = (),
    dtype: torch.dtype = torch.float64,
    std: float = 0.2,
    seed: int = 0,
) -> Instance:
    """Build ``case`` at ``shape``, perturb its parameters, cast to ``dtype``, evaluation mode."""
    torch.manual_seed(seed)
    owner = case.make(shape or case.shape)
    assert isinstance(owner, nn.Module)
    perturb(owner, std, seed)
    owner.to(dtype).eval()
    return Instance(owner, *condition(case, owner, batch, dtype))


def condition(
    case: Case, owner: nn.Module, batch: tuple[int, ...], dtype: torch.dtype
) -> tuple[Transform, Tensor | None]:
    if not case.context_dim:
        assert isinstance(owner, Transform)
        return owner, None
    context = torch.randn(*batch, case.context_dim, dtype=dtype)
    assert isinstance(owner, ConditionalTransform)
    return owner.condition(context), context


def networks(module: nn.Module) -> list[nn.Module]:
    """The outermost networks (modules from ``pyro_nf.nn``) inside ``module``."""
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if type(child).__module__.startswith("pyro_nf.nn"):
                found.append(child)
            else:
                visit(child)

    visit(module)
    return found


class CallCounter:
    """Counts forward calls of every network inside a module."""

    def __init__(self, module: nn.Module) -> None:
        self.nets = networks(module)
        self.counts = [0] * len(self.nets)
        self.handles = [net.register_forward_hook(self._hook(i)) for i, net in enumerate(self.nets)]

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(*_: object) -> None:
            self.counts[i] += 1

        return hook

    def reset(self) -> None:
        self.counts = [0] * len(self.nets)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
