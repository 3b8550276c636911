"""The contract every pyro_nf transform meets: the cases and the helpers of the shared suite.

A transform family joins the suite by adding one :class:`Case` to ``CASES``;
``tests/test_contract.py`` runs every case through the same checks.

With ``PYRO_NF_COMPILE=BACKEND`` in the environment (``aot_eager``, ``inductor``, ...) every image case
is built with its blocks compiled (:func:`pyro_nf.compiled.compile_flow`), so the suite runs the image
flows in the compiled mode: ``PYRO_NF_COMPILE=aot_eager pytest tests/test_contract.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pyro.distributions.conditional import ConditionalTransform
from torch import Tensor, nn
from torch.distributions import Transform

from pyro_nf.compiled import compile_flow
from pyro_nf.core import FlowStack, InverseTransformModule
from pyro_nf.transforms import (
    FFJORD,
    ConditionalLatentAffine,
    FactorOut,
    actnorm,
    batch_norm,
    conditional_ffjord,
    conditional_glow,
    conditional_iaf,
    conditional_maf,
    conditional_nsf,
    conditional_realnvp,
    conditional_sylvester,
    ffjord,
    ffjord_multiscale,
    glow,
    glow_step,
    iaf,
    image_coupling,
    invertible_conv1x1,
    maf,
    nsf,
    prior_coupling,
    realnvp,
    realnvp_multiscale,
    squeeze,
)
from pyro_nf.transforms.multiscale import squeezed_shape

CONTEXT_DIM = 3
COMPILE_BACKEND = os.environ.get("PYRO_NF_COMPILE") or None
"""The ``torch.compile`` backend every case is compiled with, or None (eager)."""


@dataclass(frozen=True)
class Case:
    """One transform under contract.

    ``make(shape)`` builds the transform (or, with ``context_dim``, the
    conditional transform) for an event shape. ``vector`` cases take any
    ``(D,)`` and also run the D = 1 and 2D-density checks (``min_dim = 2``: the
    factory refuses D = 1, as a coupling flow with nothing to condition on does).
    ``shape`` is the event shape used by the other checks.
    """

    name: str
    make: Callable[[tuple[int, ...]], Transform | ConditionalTransform]
    shape: tuple[int, ...] = (5,)
    context_dim: int = 0
    vector: bool = True
    min_dim: int = 1
    autoregressive: bool = False
    networks: bool = True  # False for transforms without a network (the one-pass check counts networks)
    # Network calls that make one pass, read from the transform after the pass (default: 1 call per network):
    # one count for every network, or a list with one count per network (in the order of ``networks``).
    # A CNF's pass is one ODE solve: as many calls as the solve's function evaluations (its ``nfe``).
    calls_per_pass: Callable[[Transform], int | list[int]] | None = None
    marks: tuple[object, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        return self.name


def _d(shape: tuple[int, ...]) -> int:
    return shape[0]


def _nfe(t: Transform) -> int:
    return t.nfe  # type: ignore[attr-defined]


def _block_nfes(t: Transform) -> list[int]:
    """The ``nfe`` of every CNF block of a stack, in the order of their networks."""
    assert isinstance(t, nn.Module)
    return [m.nfe for m in t.modules() if isinstance(m, FFJORD)]


CASES: list[Case] = [
    Case("maf", lambda s: maf(_d(s), [16, 16], 3), autoregressive=True),
    Case(
        "maf-random-residual-batchnorm",
        lambda s: maf(_d(s), [16, 16], 3, permutation="random", residual=True, batch_norm=True),
        autoregressive=True,
    ),
    Case("maf-gate", lambda s: maf(_d(s), [16], 2, scale="gate", permutation="none"), autoregressive=True),
    Case("iaf", lambda s: iaf(_d(s), [16, 16], 3), autoregressive=True),
    Case("iaf-actnorm", lambda s: iaf(_d(s), [16], 2, actnorm=True), autoregressive=True),
    Case("maf-no-actnorm", lambda s: maf(_d(s), [16], 2, actnorm=False), autoregressive=True),
    Case("actnorm-vector", lambda s: actnorm(_d(s)), networks=False),
    Case("realnvp", lambda s: realnvp(_d(s), [16, 16], 4), min_dim=2),
    Case(
        "realnvp-alternate-batchnorm",
        lambda s: realnvp(_d(s), [16], 4, mask="alternate", batch_norm=True),
        min_dim=2,
    ),
    Case("batch_norm", lambda s: batch_norm(_d(s)), networks=False),
    # neural spline flows: bound 1 puts about a third of the N(0, 1) test inputs in the tails (the identity)
    Case("nsf", lambda s: nsf(_d(s), [16, 16], 3, bins=5, bound=1.0), autoregressive=True),
    Case("nsf-iaf", lambda s: nsf(_d(s), [16], 2, parallel="forward", bound=1.5), autoregressive=True),
    Case(
        "nsf-random-residual-reference",
        lambda s: nsf(_d(s), [16, 16], 2, bins=3, permutation="random", residual=True, sequential="reference"),
        autoregressive=True,
    ),
    Case("nsf-coupling", lambda s: nsf(_d(s), [16, 16], 3, coupling=True, bound=1.0), min_dim=2),
    Case("nsf-coupling-alternate", lambda s: nsf(_d(s), [16], 2, coupling=True, mask="alternate", bins=4), min_dim=2),
    Case("inverse-maf", lambda s: InverseTransformModule(maf(_d(s), [16], 2))),
    Case("conditional_maf", lambda s: conditional_maf(_d(s), CONTEXT_DIM, [16, 16], 3), context_dim=CONTEXT_DIM),
    Case("conditional_iaf", lambda s: conditional_iaf(_d(s), CONTEXT_DIM, [16, 16], 3), context_dim=CONTEXT_DIM),
    Case(
        "conditional_realnvp",
        lambda s: conditional_realnvp(_d(s), CONTEXT_DIM, [16, 16], 4),
        context_dim=CONTEXT_DIM,
    ),
    Case(
        "conditional_nsf",
        lambda s: conditional_nsf(_d(s), CONTEXT_DIM, [16, 16], 2, bound=1.0),
        context_dim=CONTEXT_DIM,
    ),
    Case(
        "conditional_nsf-iaf",
        lambda s: conditional_nsf(_d(s), CONTEXT_DIM, [16], 2, parallel="forward", bins=4),
        context_dim=CONTEXT_DIM,
    ),
    Case(
        "conditional_nsf-coupling",
        lambda s: conditional_nsf(_d(s), CONTEXT_DIM, [16], 3, coupling=True, bound=1.0),
        context_dim=CONTEXT_DIM,
    ),
    Case(
        "ffjord", lambda s: ffjord(_d(s), [8, 8], trace="exact", rtol=1e-8, atol=1e-8), shape=(3,), calls_per_pass=_nfe
    ),
    Case(
        "conditional_ffjord",
        lambda s: conditional_ffjord(_d(s), CONTEXT_DIM, [8, 8], trace="exact", rtol=1e-8, atol=1e-8),
        shape=(3,),
        context_dim=CONTEXT_DIM,
        calls_per_pass=_nfe,
    ),
    Case(
        "conditional_sylvester",
        lambda s: conditional_sylvester(_d(s), CONTEXT_DIM, [16], num_transforms=2, num_householder=3),
        context_dim=CONTEXT_DIM,
    ),
    Case("actnorm", lambda s: actnorm(s), shape=(2, 4, 4), vector=False, networks=False),
    Case("conv1x1-lu", lambda s: invertible_conv1x1(s), shape=(3, 4, 4), vector=False, networks=False),
    Case("conv1x1-plain", lambda s: invertible_conv1x1(s, lu=False), shape=(3, 4, 4), vector=False, networks=False),
    Case(
        "squeeze-coupling-unsqueeze",
        lambda s: FlowStack([squeeze(s), image_coupling(squeezed_shape(s), 8), squeeze(s).inv]),
        shape=(2, 4, 4),
        vector=False,
    ),
    Case("image_coupling-channel", lambda s: image_coupling(s, 8), shape=(3, 4, 4), vector=False),
    Case(
        "image_coupling-additive",
        lambda s: image_coupling(s, 8, parity=1, coupling="additive"),
        shape=(3, 4, 4),
        vector=False,
    ),
    Case(
        "image_coupling-spline",
        lambda s: image_coupling(s, 8, coupling="spline", bins=4, bound=1.0),
        shape=(3, 4, 4),
        vector=False,
    ),
    Case(
        "image_coupling-spline-checkerboard",
        lambda s: image_coupling(s, 8, mask="checkerboard", coupling="spline", network="resnet", num_blocks=1),
        shape=(1, 4, 4),
        vector=False,
    ),
    Case(
        "image_coupling-checkerboard",
        lambda s: image_coupling(s, 8, mask="checkerboard", parity=1, network="resnet", num_blocks=1, norm="batch"),
        shape=(1, 4, 4),
        vector=False,
    ),
    Case(
        "factor_out",
        lambda s: FactorOut(s, image_coupling((s[0] // 2, *s[1:]), 8), prior_coupling(s)),
        shape=(4, 2, 2),
        vector=False,
    ),
    Case("glow_step", lambda s: glow_step(s, 8), shape=(4, 2, 2), vector=False),
    Case("glow", lambda s: glow(s, levels=2, depth=2, hidden_channels=8), shape=(1, 4, 4), vector=False),
    Case(
        "glow-additive-plain", lambda s: glow(s, 2, 1, 8, coupling="additive", lu=False), shape=(1, 4, 4), vector=False
    ),
    Case(
        "glow-spline",
        lambda s: glow(s, levels=2, depth=1, hidden_channels=8, coupling="spline", bins=4, bound=1.0),
        shape=(1, 4, 4),
        vector=False,
    ),
    Case(
        "conditional_glow",
        lambda s: conditional_glow(s, CONTEXT_DIM, levels=2, depth=2, hidden_channels=8),
        shape=(1, 4, 4),
        vector=False,
        context_dim=CONTEXT_DIM,
    ),
    Case(
        "conditional_latent_affine",
        lambda s: ConditionalLatentAffine(s, CONTEXT_DIM),
        context_dim=CONTEXT_DIM,
        networks=False,
    ),
    Case(
        "realnvp_multiscale",
        lambda s: realnvp_multiscale(
            s, levels=1, hidden_channels=8, num_blocks=1, learned_prior=True, actnorm=True, log_scale_bound=1.0
        ),
        shape=(1, 4, 4),
        vector=False,
    ),
    Case(
        "realnvp_multiscale-spline",
        lambda s: realnvp_multiscale(s, levels=1, hidden_channels=8, num_blocks=1, coupling="spline", bound=1.0),
        shape=(1, 4, 4),
        vector=False,
    ),
    Case(
        "ffjord_multiscale",
        lambda s: ffjord_multiscale(
            s,
            levels=1,
            blocks_per_scale=1,
            hidden_channels=[4],
            trace="exact",
            t1=0.5,
            rtol=1e-8,
            atol=1e-8,
            adjoint=False,
        ),
        shape=(1, 4, 4),
        vector=False,
        calls_per_pass=_block_nfes,
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
    if COMPILE_BACKEND is not None and not case.vector:
        torch._dynamo.reset()  # every case compiles afresh: no variant limit shared across cases
        compile_flow(owner, backend=COMPILE_BACKEND)
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
