"""CUDA graphs for flows: one launch for a whole sampling call, density or training loss.

On a GPU, a flow at moderate batch sizes is bound by kernel launches rather than by
arithmetic, most of all in the sequential direction of an autoregressive flow (MAF
sampling, IAF density of data), whose ``D`` small steps per layer each launch a handful
of kernels. A CUDA graph records the launches of one call once and replays them all
with a single launch:

- :func:`capture` records a call made without gradients (``model.log_prob`` in
  evaluation, a flow applied to given noise) and returns a :class:`CapturedCall`;
- :func:`capture_sampler` records sampling from a :class:`~pyro_nf.FlowModel`: the base
  noise is drawn outside the graph, into its input, then the flow is replayed;
- :func:`capture_module` records the forward and the backward pass of a module (for
  example a :class:`~pyro_nf.FlowModel`, whose forward is ``log_prob``) for training, with
  :func:`torch.cuda.make_graphed_callables`;
- :func:`capture_step` records a whole training step, forward, backward and the optimizer's
  update, as one graph (:class:`pyro_nf.training.step.TrainingStep` builds on it).

What a replay does is fixed at capture time: the same shapes, dtypes and device, and the
Python control flow taken then. Parameters and buffers are read in place, so optimizer
steps are seen by the next replay. Random draws inside a capture are refused by some
torch versions (torch 2.11 stops with "operation not permitted when stream is capturing",
and the generator stays unusable in that process), so nothing here draws inside a graph.
Input checks (pyro_nf's and torch.distributions') synchronise with the host, which a
capture forbids, so they are switched off while capturing: check inputs before passing
them to a replay.

Example (on a machine with a GPU)::

    model = FlowModel(maf(64, [256, 256]), (64,)).cuda()
    sample = capture_sampler(model, (4096,))
    x = sample()  # 4096 fresh samples: one noise draw and one graph launch
    density = capture(model.log_prob, x)
    log_p = density(x)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import torch
from torch import Tensor, nn

from pyro_nf.checks import validation
from pyro_nf.core import fused_forward

__all__ = ["CapturedCall", "capture", "capture_module", "capture_sampler", "capture_step"]


@contextlib.contextmanager
def _capturable() -> Iterator[None]:
    """Switch off the input checks that read values back to the host."""
    with validation(False), pyro.validation_enabled(False):
        yield


def _cuda_device(device: torch.device | str | None, inputs: tuple[Tensor, ...], name: str) -> torch.device:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{name}: CUDA graphs need a CUDA device, and torch sees none")
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected tensors as inputs, got {type(x).__name__} for input {i}")
        if x.device.type != "cuda":
            raise ValueError(f"{name}: expected CUDA tensors, got input {i} on {x.device}")
    if device is None:
        return inputs[0].device if inputs else torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA device, got {device}")
    return device


def _clone(outputs: Any) -> Any:
    if isinstance(outputs, Tensor):
        return outputs.clone()
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_clone(o) for o in outputs)
    return outputs


class CapturedCall:
    """A call recorded in a CUDA graph; calling it copies the inputs in and replays the graph.

    Built by :func:`capture`. Outputs are copied out of the graph's memory unless
    ``copy_outputs=False``, in which case the next replay overwrites them.
    """

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple[Tensor, ...], outputs: Any, copy_outputs: bool):
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs
        self.copy_outputs = copy_outputs

    def __call__(self, *inputs: Tensor) -> Any:
        if len(inputs) != len(self.inputs):
            raise TypeError(f"captured call: expected {len(self.inputs)} inputs, got {len(inputs)}")
        for i, (x, static) in enumerate(zip(inputs, self.inputs)):
            if not isinstance(x, Tensor):
                raise TypeError(f"captured call: expected a tensor for input {i}, got {type(x).__name__}")
            if x.shape != static.shape or x.dtype != static.dtype or x.device != static.device:
                raise ValueError(
                    f"captured call: input {i} must match the capture, {tuple(static.shape)} {static.dtype} on "
                    f"{static.device}; got {tuple(x.shape)} {x.dtype} on {x.device} (capture again for new shapes)"
                )
            static.copy_(x)
        self.graph.replay()
        if not self.copy_outputs:
            return self.outputs
        return _clone(self.outputs)


def capture(
    fn: Callable[..., Any],
    *inputs: Tensor,
    device: torch.device | str | None = None,
    warmup: int = 3,
    copy_outputs: bool = True,
) -> CapturedCall:
    """Record ``fn(*inputs)``, computed without gradients, in a CUDA graph.

    ``fn`` runs ``warmup`` times on a side stream first (so that lazy initialisation,
    cached layouts and the allocator settle), then once under capture. ``inputs`` are
    copied into static buffers that every replay reads; ``device`` is needed only when
    there are no inputs (e.g. sampling).

    Args:
        fn: a function of CUDA tensors returning a tensor or a (nested) tuple of tensors.
        inputs: example inputs, with the shapes, dtypes and device of every later call.
        device: the CUDA device, when ``fn`` takes no inputs.
        warmup: eager calls before the capture.
        copy_outputs: return copies of the outputs (default) rather than the graph's own.

    Raises:
        RuntimeError: if torch sees no CUDA device.
        ValueError: if an input or ``device`` is not on CUDA.
    """
    device = _cuda_device(device, inputs, "capture")
    with torch.no_grad():
        return _record(fn, inputs, device, warmup, copy_outputs)


def _record(
    fn: Callable[..., Any], inputs: tuple[Tensor, ...], device: torch.device, warmup: int, copy_outputs: bool
) -> CapturedCall:
    """Warm ``fn`` up on a side stream, then record one call of it on static copies of ``inputs``."""
    static = tuple(x.detach().clone() for x in inputs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device), _capturable():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*static)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            outputs = fn(*static)
    return CapturedCall(graph, static, outputs, copy_outputs)


def capture_step(step: Callable[..., Any], *inputs: Tensor, warmup: int = 3) -> CapturedCall:
    """Record a whole training step — forward, backward and the optimizer's update — as one CUDA graph.

    ``step(*inputs)`` must set the gradients to None first (``optimizer.zero_grad(set_to_none=True)``,
    so that the backward pass allocates them in the graph's memory), then compute the loss, call
    ``backward()``, clip and update, and return tensors (the loss, the gradient norm). The optimizer
    must be capturable (``torch.optim.Adam(..., capturable=True)``; a learning rate that changes
    between replays must be a tensor on the device, updated in place). Each call of the result
    copies the inputs into the graph's static inputs, replays the whole step with one launch and
    returns copies of its outputs.

    The ``warmup`` calls before the capture are real steps: they update the parameters and the
    optimizer state, so save what must not change and put it back after the capture
    (:class:`pyro_nf.training.step.TrainingStep` does). Nothing may read a value back to the host
    inside ``step`` (no ``.item()``; pyro_nf's input checks are switched off while recording).
    """
    device = _cuda_device(None, inputs, "capture_step")
    return _record(step, inputs, device, warmup, copy_outputs=True)


def capture_module(module: nn.Module, *inputs: Tensor, warmup: int = 3) -> Callable[..., Any]:
    """Record the forward and backward passes of ``module`` (e.g. a ``FlowModel``) for training.

    Returns a callable with the module's parameters that runs ``module(*inputs)`` and, on
    ``backward``, its gradient, each as one graph replay (see
    :func:`torch.cuda.make_graphed_callables`, which this wraps with the input checks off).
    Inputs must keep the example's shapes; the loss reduction and the optimizer step stay
    outside the graph::

        log_prob = capture_module(model, batch)
        loss = -log_prob(batch).mean()
        loss.backward()
        optimizer.step()
    """
    _cuda_device(None, inputs, "capture_module")
    if not isinstance(module, nn.Module):
        raise TypeError(f"capture_module: expected an nn.Module, got {type(module).__name__}")
    with _capturable():
        return torch.cuda.make_graphed_callables(
            module, tuple(inputs), num_warmup_iters=warmup, allow_unused_input=True
        )


def capture_sampler(
    model: nn.Module, sample_shape: tuple[int, ...] | torch.Size, *, temperature: float = 1.0, warmup: int = 3
) -> Callable[[], Tensor]:
    """Sampling from a flow model (a :class:`~pyro_nf.FlowModel`) as one graph replay per call.

    Each call draws standard Normal noise of shape ``sample_shape + event_shape``, scaled
    by ``temperature``, into the graph's input (one eager kernel), replays the flow's
    forward pass recorded by :func:`capture`, and returns a copy of the samples.
    """
    base = getattr(model, "base_dist", None)
    flow = getattr(model, "flow", None)
    if base is None or flow is None:
        raise TypeError(f"capture_sampler: expected a flow model with base_dist and flow, got {type(model).__name__}")
    noise = base.sample(torch.Size(sample_shape))
    call = capture(lambda z: fused_forward(flow, z)[0], noise, warmup=warmup, copy_outputs=False)
    static = call.inputs[0]

    def sample() -> Tensor:
        static.normal_(0.0, temperature)
        call.graph.replay()
        return call.outputs.clone()

    return sample
