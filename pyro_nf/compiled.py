"""``torch.compile`` for flows: the repeated blocks of an image flow compiled once per shape.

A Glow of depth ``K`` repeats one :class:`~pyro_nf.transforms.glow.GlowStep` ``K`` times per
level. Compiling the whole model traces every step and hands one long graph to the compiler
(minutes for the default MNIST Glow); compiling the blocks instead traces one step per
distinct shape and reuses the compiled code for every step of that shape (torch.compile keys
its cache on the code and on guards over shapes and settings, not on the module), and leaves the
cheap glue between blocks (squeezes, factor-outs, the sums of log-dets) eager. Both work:
``torch.compile(model)`` compiles the model whole, with no graph break inside a Glow step.

:func:`compile_flow` compiles, in place, the fused methods (``_forward_and_log_det`` and
``_inverse_and_log_det``) of

- every Glow step (ActNorm, 1x1 convolution and coupling in one graph);
- every other pyro_nf transform with parameters and no pyro_nf transform inside it (the
  couplings of multiscale RealNVP, Glow's learned priors, ActNorm and 1x1 convolutions outside
  a Glow step).

CNF blocks (FFJORD) stay eager: their divergence estimate differentiates the vector field, and
training differentiates that again, which compiled graphs do not support. Conditional layers
(whose ``.condition(context)`` builds a new transform per call) stay eager too.

What changes under compilation: the checks of finite input values (a host read) are skipped
while compiling (see :mod:`pyro_nf.checks`), so only the checks of type, dtype, device and shape
remain in a compiled call; ActNorm's data-dependent initialisation is done without reading its
``initialised`` flag back (see :class:`~pyro_nf.transforms.ActNorm`). A pickled or deep-copied
flow is not compiled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pyro_nf.core import FlowTransform
from pyro_nf.transforms.continuous import ConditionedFFJORD
from pyro_nf.transforms.glow import GlowStep

__all__ = ["COMPILED_METHODS", "compile_flow", "compiled_blocks"]

COMPILED_METHODS = ("_forward_and_log_det", "_inverse_and_log_det")
"""The methods :func:`compile_flow` replaces on each block (instance attributes; dropped when pickled)."""

_RECOMPILE_LIMIT = 64
"""Compiled variants allowed per block class: one per shape, mask and parity of a flow's blocks."""


def _is_block(module: nn.Module) -> bool:
    if isinstance(module, GlowStep):
        return True
    if not isinstance(module, FlowTransform) or next(module.parameters(), None) is None:
        return False
    return not any(isinstance(m, FlowTransform) for m in module.modules() if m is not module)


def compiled_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks of ``module`` that :func:`compile_flow` compiles, outermost first.

    Example::

        >>> from pyro_nf.transforms import glow
        >>> sorted({type(b).__name__ for b in compiled_blocks(glow((1, 8, 8), levels=2, depth=2, hidden_channels=8))})
        ['GlowStep', 'ImageCoupling']
    """
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        if isinstance(m, ConditionedFFJORD):
            return
        if _is_block(m):
            found.append(m)
            return
        for child in m.children():
            visit(child)

    visit(module)
    return found


def compile_flow(module: nn.Module, **options: Any) -> nn.Module:
    """Compile the repeated blocks of a flow (or of a model holding one) in place; returns ``module``.

    Every block listed by :func:`compiled_blocks` gets its two fused methods wrapped in
    ``torch.compile(method, **options)`` (for example ``backend="aot_eager"`` or
    ``mode="max-autotune-no-cudagraphs"``). Blocks that are already compiled are left as they
    are. The first call of each distinct block compiles it (on a CPU this needs a C++
    compiler); later calls of a block of the same class and shape reuse that code. The limit
    of compiled variants per code object is raised to at least 64, since a flow's blocks
    share their methods' code.

    Shapes are static unless ``dynamic`` is given: each shape a block sees (one per level of a
    multiscale flow, and a new batch size such as an epoch's last partial batch) is compiled
    once for that shape. With ``torch.compile``'s default, the second shape turns on symbolic
    sizes, and inductor (torch 2.13) then fails on a batch of one ("cannot determine truth value
    of Relational"); static kernels are also what a captured CUDA graph replays.

    Example::

        >>> from pyro_nf import FlowModel
        >>> from pyro_nf.transforms import glow
        >>> model = compile_flow(FlowModel(glow((1, 4, 4), levels=1, depth=2, hidden_channels=8), (1, 4, 4)),
        ...                      backend="eager")
        >>> model.log_prob(torch.rand(3, 1, 4, 4)).shape
        torch.Size([3])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"compile_flow: expected an nn.Module, got {type(module).__name__}")
    options.setdefault("dynamic", False)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, _RECOMPILE_LIMIT)
    for block in compiled_blocks(module):
        for name in COMPILED_METHODS:
            if name not in vars(block):  # not compiled yet
                setattr(block, name, torch.compile(getattr(block, name), **options))
    return module
