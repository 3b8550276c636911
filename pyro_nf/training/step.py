"""One training step — forward, backward, clipping, optimizer update — in the form a device runs fastest.

A step of an image flow on a GPU is bound by launches and Python, not by arithmetic: the
default MNIST Glow launches some six thousand small operations per step. :class:`TrainingStep`
runs the same step in any of these forms, each an option:

- **eager** (the default): the step as written, operation by operation;
- **compiled** (``compile=True`` or ``"blocks"``): the flow's repeated blocks compiled with
  ``torch.compile`` (:func:`pyro_nf.compiled.compile_flow`), element-wise work fused into few
  kernels, the glue between blocks eager; ``compile="whole"``: the whole loss compiled as one
  graph (static shapes), which takes longer to compile and leaves less work to the host;
- **captured** (``cuda_graph=True``, CUDA only): the whole step recorded once as a CUDA graph
  (:func:`pyro_nf.graphs.capture_step`) and replayed with one launch per step; combines with
  ``compile``;
- **bf16** (``precision="bf16"``): the coupling networks under ``torch.autocast`` in bfloat16,
  while the affine maps, the 1x1 convolutions, every log-det and the loss stay in float32;
- **channels_last** (``channels_last=True``): the networks' convolution weights in the
  ``channels_last`` memory format, so the convolutions run on ``(N, H, W, C)`` data (on one CPU
  thread the coupling network of the default MNIST Glow, batch 64, forward and backward, runs 1.33x
  faster so at 14x14 and 1.06x at 7x7).

Calling the step with a batch returns ``[loss, gradient norm]`` as a tensor on the device,
after the update, without reading it back, so a loop can read the losses every few steps
instead of synchronising with the device every step.

A captured step is the eager step replayed: the same loss and gradients to float32 rounding.
To record it, the step runs a few times for real (warm-up), so the parameters, buffers and
optimizer state are saved before and put back after the capture; a data-dependent
initialisation (ActNorm) is done first, from the first batch, as the eager step would.
Inputs must keep the first batch's shape.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from pyro_nf.checks import check_choice
from pyro_nf.compiled import compile_flow
from pyro_nf.graphs import CapturedCall, capture_step
from pyro_nf.training.config import ConfigError, TrainConfig
from pyro_nf.training.distributed import DistributedContext
from pyro_nf.training.validation import step_modes
from pyro_nf.transforms.normalization import ActNorm

__all__ = [
    "COMPILE_SCOPES",
    "CompileScope",
    "PRECISIONS",
    "Precision",
    "TrainingStep",
    "autocast",
    "read_interval",
    "training_step",
]

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")
CompileScope = Literal["blocks", "whole"]
COMPILE_SCOPES: tuple[CompileScope, ...] = ("blocks", "whole")


def _compile_scope(compile: object) -> CompileScope | None:
    """``compile`` as a scope: ``False`` is none, ``True`` is ``"blocks"``; a clear error for anything else."""
    if isinstance(compile, bool):
        return "blocks" if compile else None
    if not isinstance(compile, str):
        raise TypeError(f"compile: expected a bool or one of {COMPILE_SCOPES}, got {type(compile).__name__}")
    check_choice(compile, COMPILE_SCOPES, "compile")
    return compile  # type: ignore[return-value]


def autocast(device: torch.device | str, precision: Precision) -> contextlib.AbstractContextManager[object]:
    """The context of a forward pass at ``precision``: nothing for ``"fp32"``, bf16 autocast for ``"bf16"``.

    The autocast weight cache is off, as a CUDA graph capture requires. pyro_nf's coupling layers cast
    their networks' outputs back to the input's dtype and keep the 1x1 convolutions out of autocast, so
    only the networks run in bfloat16.

    Example::

        >>> with autocast("cpu", "bf16"):
        ...     torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype
        torch.bfloat16
    """
    check_choice(precision, PRECISIONS, "precision")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)


class TrainingStep:
    """One optimizer step of a model on a batch, eager or compiled, fp32 or bf16, optionally captured.

    Args:
        model: the module whose parameters the optimizer updates (a :class:`~pyro_nf.FlowModel`);
            ``compile=True`` compiles its flow's blocks in place.
        optimizer: an optimizer of ``model``'s parameters; ``cuda_graph`` and ``fused_optimizer``
            need one with fused and capturable forms (Adam, AdamW).
        loss: the scalar loss of a batch, e.g. ``lambda x: -model.log_prob(x).mean()``.
        compile: ``True`` or ``"blocks"``: compile the flow's repeated blocks
            (:func:`~pyro_nf.compiled.compile_flow`); ``"whole"``: compile ``loss`` as one graph
            (``torch.compile(loss, dynamic=False)``; ``compile_options`` may add ``fullgraph=True``).
            The data-dependent initialisation (ActNorm) runs the loss eagerly.
        cuda_graph: record the whole step as a CUDA graph on the first call and replay it.
        precision: ``"fp32"`` or ``"bf16"`` (see :func:`autocast`).
        grad_clip: the largest gradient norm; 0 leaves the gradient as it is (its norm is still reported).
        channels_last: put ``model``'s convolution weights in the ``channels_last`` memory format (in place).
        fused_optimizer: the optimizer's fused implementation (one kernel per update). Default: on
            when compiling or capturing, else the optimizer as it was built.
        compile_options: keyword arguments of ``torch.compile``.

    Example::

        >>> from pyro_nf import FlowModel
        >>> from pyro_nf.transforms import glow
        >>> model = FlowModel(glow((1, 4, 4), levels=1, depth=1, hidden_channels=8), (1, 4, 4))
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        >>> step = TrainingStep(model, optimizer, lambda x: -model.log_prob(x).mean(), grad_clip=50.0)
        >>> loss, grad_norm = step(torch.rand(8, 1, 4, 4)).tolist()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: Callable[[Tensor], Tensor],
        *,
        compile: bool | CompileScope = False,
        cuda_graph: bool = False,
        precision: Precision = "fp32",
        grad_clip: float = 0.0,
        fused_optimizer: bool | None = None,
        channels_last: bool = False,
        compile_options: dict[str, object] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"TrainingStep: expected an nn.Module as model, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"TrainingStep: expected a torch optimizer, got {type(optimizer).__name__}")
        check_choice(precision, PRECISIONS, "precision")
        scope = _compile_scope(compile)
        if isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float)) or not grad_clip >= 0:
            raise ValueError(f"grad_clip: expected a number >= 0 (0 turns clipping off), got {grad_clip!r}")
        if cuda_graph and not torch.cuda.is_available():
            raise RuntimeError("TrainingStep: cuda_graph=True needs a CUDA device, and torch sees none")
        self.model = model
        self.optimizer = optimizer
        self.loss = self.eager_loss = loss
        self.compile_scope: CompileScope | None = scope
        self.cuda_graph = bool(cuda_graph)
        self.precision: Precision = precision
        self.grad_clip = float(grad_clip) if grad_clip > 0 else math.inf
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        fused = (self.compiled or self.cuda_graph) if fused_optimizer is None else bool(fused_optimizer)
        if fused or self.cuda_graph:
            _prepare_optimizer(optimizer, fused=True, capturable=self.cuda_graph)
        if channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if scope == "blocks":
            compile_flow(model, **(compile_options or {}))
        elif scope == "whole":
            self.loss = torch.compile(loss, **{"dynamic": False, **(compile_options or {})})
        self._graph: CapturedCall | None = None
        self._initialised = False

    @property
    def compiled(self) -> bool:
        """Whether the step runs compiled code (either scope)."""
        return self.compile_scope is not None

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group (in place where a captured step reads it)."""
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def run(self, batch: Tensor) -> Tensor:
        """The step itself, eagerly: what a captured step records. Returns ``[loss, gradient norm]``."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(batch.device, self.precision):
            loss = self.loss(batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        loss = loss.detach().float()
        return torch.stack([loss, norm.detach().to(loss)])

    def __call__(self, batch: Tensor) -> Tensor:
        """One step on ``batch``: ``[loss, gradient norm]`` on the device (the loss before the update)."""
        if not self.cuda_graph:
            if self.compile_scope == "whole" and not self._initialised:  # one compiled variant: ActNorm first
                self._initialise(batch)
                self._initialised = True
            return self.run(batch)
        if self._graph is None:
            self._graph = self._capture(batch)
        return self._graph(batch)  # type: ignore[no-any-return]

    # -- the capture ----------------------------------------------------------------------
    def _capture(self, batch: Tensor) -> CapturedCall:
        self._initialise(batch)
        saved = self._state()
        graph = capture_step(self.run, batch)
        self._restore(saved)
        return graph

    def _initialise(self, batch: Tensor) -> None:
        """Run the data-dependent initialisation (ActNorm) on ``batch`` before the warm-up; nothing else changes."""
        pending = [m for m in self.model.modules() if isinstance(m, ActNorm) and m.initialisation_pending()]
        if not pending:
            return
        kept = {id(t) for m in pending for t in (*m.parameters(), *m.buffers())}
        saved = {id(t): (t, t.detach().clone()) for t in _tensors(self.model) if id(t) not in kept}
        with torch.no_grad(), autocast(batch.device, self.precision):
            self.eager_loss(batch)  # a compiled loss would compile a no-grad variant for this one pass
        with torch.no_grad():
            for t, value in saved.values():
                t.copy_(value)  # batch statistics (batch norm) are not advanced by this extra pass

    def _state(self) -> dict[int, tuple[Tensor, Tensor]]:
        tensors = [*_tensors(self.model), *self._optimizer_tensors()]
        return {id(t): (t, t.detach().clone()) for t in tensors}

    def _optimizer_tensors(self) -> list[Tensor]:
        return [v for p in self.params for v in self.optimizer.state.get(p, {}).values() if isinstance(v, Tensor)]

    def _restore(self, saved: dict[int, tuple[Tensor, Tensor]]) -> None:
        """Undo the warm-up: saved tensors get their values back, optimizer state it created starts at zero."""
        with torch.no_grad():
            for t, value in saved.values():
                t.copy_(value)
            for t in self._optimizer_tensors():
                if id(t) not in saved:
                    t.zero_()  # Adam's moments and step count, as a first step would create them


def _tensors(model: nn.Module) -> list[Tensor]:
    seen: dict[int, Tensor] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen.setdefault(id(t), t)
    return list(seen.values())


def _prepare_optimizer(optimizer: torch.optim.Optimizer, *, fused: bool, capturable: bool) -> None:
    """Switch an optimizer to its fused (and capturable) form; a captured step reads the rate from a tensor."""
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        if "fused" not in group or (capturable and "capturable" not in group):
            raise TypeError(f"TrainingStep: {name} has no fused, capturable form; use torch.optim.Adam or AdamW")
        group["fused"], group["foreach"] = fused, None
        if capturable:
            group["capturable"] = True
            device = group["params"][0].device
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, Tensor):  # a resumed state keeps its step count on the CPU
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


def training_step(
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: Callable[[Tensor], Tensor],
    device: torch.device,
    context: DistributedContext,
) -> TrainingStep:
    """The :class:`TrainingStep` of a run: the modes of :func:`~pyro_nf.training.validation.step_modes` on ``device``.

    Raises:
        ConfigError: ``--cuda-graphs`` in a run of several processes.
    """
    modes = step_modes(config, device)
    if modes["cuda_graphs"] and context.world_size > 1:
        raise ConfigError("--cuda-graphs records the step of one process; drop it under torchrun")
    return TrainingStep(
        model,
        optimizer,
        loss,
        compile=modes["compile"],
        cuda_graph=modes["cuda_graphs"],
        precision=modes["precision"],
        channels_last=modes["channels_last"],
        grad_clip=config.grad_clip,
    )


def read_interval(device: torch.device, config: TrainConfig) -> int:
    """Steps between reads of the losses: every step on a CPU (free), every ``log_every`` on a GPU (a sync each)."""
    return 1 if device.type == "cpu" else config.log_every
