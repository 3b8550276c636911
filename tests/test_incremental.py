"""The incremental sequential pass of the MADE (MAF sampling, IAF density) against the D-pass reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from pyro_nf.nn.made import MADE
from pyro_nf.transforms import (
    AffineAutoregressive,
    ConditionalAffineAutoregressive,
    conditional_iaf,
    conditional_maf,
    iaf,
    maf,
)
from pyro_nf.transforms.elementwise import shift_and_log_scale

ROOT = Path(__file__).resolve().parent.parent
CONTEXT_DIM = 3


def affine_solve(forward: bool, scale: str = "softclamp"):
    """The solve step of an affine MAF (``forward``) or IAF layer, as the transforms use it."""

    def solve(g: Tensor, a: Tensor, b: Tensor) -> Tensor:
        mu, alpha = shift_and_log_scale(a, b, scale, 3.0)  # type: ignore[arg-type]
        return g * alpha.exp() + mu if forward else (g - mu) * (-alpha).exp()

    return solve


def make_made(dim: int, hidden: list[int], dtype: torch.dtype, **options: object) -> MADE:
    torch.manual_seed(0)
    made = MADE(dim, hidden, 2, zero_init_output=False, generator=torch.Generator().manual_seed(1), **options)
    with torch.no_grad():  # larger output weights, so that errors would show
        made.output_layer.weight.mul_(3.0)
    return made.to(dtype)


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

MADE_OPTIONS = [
    pytest.param(dict(order=order), [24, 24], id=f"order-{order}") for order in ("natural", "reversed", "random")
] + [
    pytest.param(dict(order="random", residual=True), [24, 24, 24], id="residual-3-layers"),
    pytest.param(dict(order="random"), [24], id="1-layer"),
    pytest.param(dict(order="reversed"), [9, 30, 5], id="3-layers-uneven"),
    pytest.param(dict(order="random", context_dim=CONTEXT_DIM), [24, 24], id="context"),
    pytest.param(dict(order="reversed", context_dim=CONTEXT_DIM, residual=True), [24, 24], id="context-residual"),
    pytest.param(dict(order="natural"), [3, 3], id="narrow"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("dim", [1, 2, 7])
@pytest.mark.parametrize("options, hidden", MADE_OPTIONS)
def test_same_numbers_as_reference(options: dict, hidden: list[int], dim: int, dtype: torch.dtype):
    made = make_made(dim, hidden, dtype, **options)
    given = torch.randn(2, 5, dim, dtype=dtype)
    # the context broadcasts against the batch: (5, C) against (2, 5, D)
    context = torch.randn(5, CONTEXT_DIM, dtype=dtype) if made.context_dim else None
    for forward in (True, False):  # MAF sampling, IAF density
        solve = affine_solve(forward)
        with torch.no_grad():
            x_ref, params_ref = made.sequential(given, solve, context, method="reference")
            x, params = made.sequential(given, solve, context)
        assert x.shape == given.shape and params.shape == (2, 5, 2 * dim)
        assert rel_err(x, x_ref) <= TOL[dtype]
        assert rel_err(params, params_ref) <= TOL[dtype]
        # and it is the solution: the parallel pass at x gives back params and x
        assert rel_err(made(x, None if context is None else context.expand(2, 5, -1)), params) <= TOL[dtype]
        assert (
            rel_err(solve(given.reshape(-1, dim), *params.reshape(-1, 2, dim).unbind(1)).reshape(x.shape), x)
            <= TOL[dtype]
        )


@pytest.mark.parametrize("grad", [True, False], ids=["recorded", "no_grad"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 10, 11, 50])
def test_every_chunk_size(chunk: int, grad: bool):
    # with autograd recording the blocks are joined out of place, without it copied into buffers
    made = make_made(10, [40, 40], torch.float64, order="random", residual=True)
    given = torch.randn(4, 10, dtype=torch.float64)
    solve = affine_solve(True)
    with torch.set_grad_enabled(grad):
        x_ref, p_ref = made.sequential(given, solve, method="reference")
        x, p = made.sequential(given, solve, chunk=chunk)
    assert x.requires_grad == p.requires_grad == grad
    if grad:  # the backward pass is chunked too
        weights = torch.randn_like(p)
        g_ref = torch.autograd.grad((x_ref**2).sum() + (p_ref * weights).sum(), list(made.parameters()))
        g = torch.autograd.grad((x**2).sum() + (p * weights).sum(), list(made.parameters()))
        assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(g, g_ref))
    assert rel_err(x, x_ref) <= 1e-10 and rel_err(p, p_ref) <= 1e-10


def test_larger_dim_float32():
    made = make_made(40, [128, 128], torch.float32, order="random")
    given = torch.randn(16, 40)
    with torch.no_grad():
        x_ref, p_ref = made.sequential(given, affine_solve(False), method="reference")
        x, p = made.sequential(given, affine_solve(False))
    assert rel_err(x, x_ref) <= 1e-5 and rel_err(p, p_ref) <= 1e-5


@pytest.mark.parametrize("dim", [1, 2, 7])
@pytest.mark.parametrize("options, hidden", MADE_OPTIONS)
def test_same_gradients_as_reference(options: dict, hidden: list[int], dim: int):
    made = make_made(dim, hidden, torch.float64, **options)
    given = torch.randn(2, 3, dim, dtype=torch.float64, requires_grad=True)
    context = torch.randn(3, CONTEXT_DIM, dtype=torch.float64, requires_grad=True) if made.context_dim else None
    inputs = [given, *made.parameters()] + ([context] if context is not None else [])
    weights = torch.randn(2, 3, dim, dtype=torch.float64)
    grads = {}
    for method in ("reference", "incremental"):
        x, params = made.sequential(given, affine_solve(False), context, method=method)
        loss = (x * weights).sum() + params.tanh().sum()
        grads[method] = torch.autograd.grad(loss, inputs, allow_unused=True)
    for g_ref, g in zip(grads["reference"], grads["incremental"]):
        if g_ref is None:  # unused in both: the output bias of position 1's a-row feeds only x_1, etc.
            assert g is None or torch.count_nonzero(g) == 0
            continue
        assert g is not None and torch.allclose(g, g_ref, rtol=1e-9, atol=1e-12)


def test_made_passes_are_not_run():
    """The incremental pass uses weight slices only: no full layer call, where the reference makes D."""
    made = make_made(6, [24, 24], torch.float32)
    calls = []
    made.input_layer.register_forward_hook(lambda *_: calls.append(1))
    made.sequential(torch.randn(3, 6), affine_solve(True))
    assert not calls
    made.sequential(torch.randn(3, 6), affine_solve(True), method="reference")
    assert len(calls) == 6


def test_backward_runs_no_made_pass():
    """The gradients come from the backward pass's cotangents and the kept activations."""
    made = make_made(6, [24, 24], torch.float64, context_dim=CONTEXT_DIM)
    context = torch.randn(3, CONTEXT_DIM, dtype=torch.float64, requires_grad=True)
    x, params = made.sequential(torch.randn(2, 3, 6, dtype=torch.float64), affine_solve(False), context)
    calls = []
    made.input_layer.register_forward_hook(lambda *_: calls.append(1))
    (x.sum() + params.square().sum()).backward()
    assert not calls
    assert context.grad is not None and all(p.grad is not None for p in made.parameters())


def test_frozen_parameters_get_no_gradient():
    made = make_made(5, [16, 16], torch.float64, context_dim=CONTEXT_DIM)
    made.input_layer.weight.requires_grad_(False)
    context = torch.randn(3, CONTEXT_DIM, dtype=torch.float64)  # no gradient wanted either
    given = torch.randn(3, 5, dtype=torch.float64)
    grads = {}
    for method in ("reference", "incremental"):
        for p in made.parameters():
            p.grad = None
        x, params = made.sequential(given, affine_solve(False), context, method=method)
        (x.sum() + params.tanh().sum()).backward()
        assert made.input_layer.weight.grad is None
        grads[method] = [p.grad.clone() for p in made.parameters() if p.requires_grad]
    for g_ref, g in zip(grads["reference"], grads["incremental"]):
        assert torch.allclose(g, g_ref, rtol=1e-9, atol=1e-12)


def test_parametrised_activation_gradients_match_reference():
    """An activation with parameters (PReLU) takes the parallel pass for the gradients."""
    made = make_made(5, [16, 16], torch.float64, activation=torch.nn.PReLU, context_dim=CONTEXT_DIM)
    with torch.no_grad():
        for act in made.activations:
            act.weight.fill_(0.3)  # type: ignore[operator]
    given = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    context = torch.randn(4, CONTEXT_DIM, dtype=torch.float64, requires_grad=True)
    inputs = [given, context, *made.parameters()]
    grads = {}
    for method in ("reference", "incremental"):
        x, params = made.sequential(given, affine_solve(False), context, method=method)
        grads[method] = torch.autograd.grad(x.sin().sum() + params.tanh().sum(), inputs, allow_unused=True)
    assert grads["reference"][-1] is not None  # the PReLU slopes get a gradient
    for g_ref, g in zip(grads["reference"], grads["incremental"]):
        if g_ref is None:
            assert g is None or torch.count_nonzero(g) == 0
            continue
        assert g is not None and torch.allclose(g, g_ref, rtol=1e-9, atol=1e-12)


def _pair(factory, *args, **options):
    """The same flow twice, incremental and reference, with equal perturbed parameters."""
    torch.manual_seed(0)
    inc = factory(*args, **options).double()
    ref = factory(*args, sequential="reference", **options).double()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in inc.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    ref.load_state_dict(inc.state_dict())
    return inc, ref


STACKS = [
    pytest.param(maf, (7, [24, 24], 3), dict(permutation="random", residual=True), id="maf"),
    pytest.param(maf, (7, [24], 2), dict(scale="gate", permutation="none"), id="maf-gate"),
    pytest.param(iaf, (7, [24, 24], 3), {}, id="iaf"),
    pytest.param(iaf, (7, [16, 16, 16], 2), dict(scale="gate", residual=True), id="iaf-gate-residual"),
    pytest.param(conditional_maf, (7, CONTEXT_DIM, [24, 24], 3), {}, id="conditional_maf"),
    pytest.param(conditional_iaf, (7, CONTEXT_DIM, [24, 24], 3), dict(permutation="random"), id="conditional_iaf"),
]


@pytest.mark.parametrize("factory, args, options", STACKS)
def test_stacks_match_reference(factory, args, options):
    inc, ref = _pair(factory, *args, **options)
    conditional = factory in (conditional_maf, conditional_iaf)
    context = torch.randn(4, CONTEXT_DIM, dtype=torch.float64, requires_grad=True)
    if conditional:
        inc, ref = inc.condition(context), ref.condition(context)
    v = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    # both directions; the sequential one is forward (sampling) for MAF, inverse (density) for IAF
    for name in ("forward_and_log_det", "inverse_and_log_det"):
        grads = []
        for flow in (inc, ref):
            out, log_det = getattr(flow, name)(v)
            wrt = [v, context] if conditional else [v, *flow.parameters()]
            grads.append(torch.autograd.grad((out**2).sum() + log_det.sum(), wrt))
            if flow is inc:
                out_i, ld_i = out, log_det
        assert rel_err(out_i, out) <= 1e-10 and rel_err(ld_i, log_det) <= 1e-10
        for g_i, g_r in zip(*grads):
            assert torch.allclose(g_i, g_r, rtol=1e-9, atol=1e-12)


def test_conditional_parameter_gradients_match():
    inc, ref = _pair(conditional_iaf, 5, CONTEXT_DIM, [16, 16], 2)
    context = torch.randn(3, CONTEXT_DIM, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    grads = []
    for flow in (inc, ref):
        z, log_det = flow.condition(context).inverse_and_log_det(x)
        grads.append(torch.autograd.grad((z**2).sum() - log_det.sum(), list(flow.parameters())))
    for g_i, g_r in zip(*grads):
        assert torch.allclose(g_i, g_r, rtol=1e-9, atol=1e-12)


def test_iaf_trains_on_data():
    """A few Adam steps of an IAF's density on data: finite, and the loss goes down."""
    torch.manual_seed(0)
    flow = iaf(4, [16, 16], 2)
    base = torch.distributions.Normal(torch.zeros(4), 1.0)
    data = torch.randn(128, 4) * torch.tensor([0.2, 1.0, 3.0, 0.5]) + 1.0
    params = list(flow.parameters())
    losses = []
    for _ in range(12):  # plain gradient steps (torch.optim's first step imports a lot)
        z, log_det = flow.inverse_and_log_det(data)
        loss = -(base.log_prob(z).sum(-1) - log_det).mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(0.05 * g)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5


def test_bad_sequential_option():
    with pytest.raises(ValueError, match="sequential: expected one of .*'incremental'.*got 'fast'"):
        maf(3, sequential="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sequential"):
        conditional_iaf(3, 2, sequential="D-pass")  # type: ignore[arg-type]
    made = MADE(3, [8])
    with pytest.raises(ValueError, match="sequential"):
        AffineAutoregressive(made, sequential=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sequential"):
        ConditionalAffineAutoregressive(MADE(3, [8], context_dim=2), sequential="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sequential"):
        made.sequential(torch.randn(2, 3), affine_solve(True), method="loop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="context"):
        MADE(3, [8], context_dim=2).sequential(torch.randn(2, 3), affine_solve(True))


def test_option_reaches_every_layer():
    flow = conditional_maf(3, 2, [8], 3, sequential="reference")
    assert {part.sequential for part in flow.parts} == {"reference"}
    assert flow.condition(torch.randn(2)).parts[0].sequential == "reference"
    assert {part.sequential for part in iaf(3, [8], 2).parts} == {"incremental"}


def test_structure_follows_loaded_orders():
    """The cached degree blocks are rebuilt when a state dict brings other orders."""
    a = MADE(5, [16], order="random", generator=torch.Generator().manual_seed(0), zero_init_output=False)
    b = MADE(5, [16], order="random", generator=torch.Generator().manual_seed(7), zero_init_output=False)
    given = torch.randn(3, 5)
    a.sequential(given, affine_solve(True))  # fills the cache
    a.load_state_dict(b.state_dict())
    x, _ = a.sequential(given, affine_solve(True))
    x_ref, _ = b.sequential(given, affine_solve(True), method="reference")
    assert rel_err(x, x_ref) <= 1e-5


def test_benchmark_smoke():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sequential.py"), "--smoke-test"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "| pyro_nf incremental |" in result.stdout and "| pyro_nf reference |" in result.stdout
    assert "IAF train step / MAF train step" in result.stdout


def test_backward_is_the_hand_written_pass_and_refuses_double_backward():
    made = make_made(6, [24, 24], torch.float64)
    given = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    x, _ = made.sequential(given, affine_solve(False))
    names, fn = [], x.grad_fn
    while fn is not None and len(names) < 4:  # past the reshape to the pass's own node
        names.append(type(fn).__name__)
        fn = fn.next_functions[0][0] if fn.next_functions else None
    assert "_IncrementalSolveBackward" in names, names
    (grad,) = torch.autograd.grad(x.sum(), given, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|does not require grad"):
        grad.sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("options", [dict(), dict(residual=True, order="random"), dict(context_dim=CONTEXT_DIM)])
def test_gradients_match_reference_on_cuda(options: dict):
    made = make_made(12, [40, 40], torch.float64, **options).cuda()
    given = torch.randn(5, 12, dtype=torch.float64, device="cuda", requires_grad=True)
    context = None
    if made.context_dim:
        context = torch.randn(5, CONTEXT_DIM, dtype=torch.float64, device="cuda", requires_grad=True)
    inputs = [given, *made.parameters()] + ([context] if context is not None else [])
    weights = torch.randn(5, 24, dtype=torch.float64, device="cuda")
    grads = {}
    for method in ("reference", "incremental"):
        x, params = made.sequential(given, affine_solve(False), context, method=method)
        grads[method] = torch.autograd.grad((x**2).sum() + (params * weights).sum(), inputs, allow_unused=True)
    for g_ref, g in zip(grads["reference"], grads["incremental"]):
        if g_ref is not None:
            assert g is not None and torch.allclose(g, g_ref, rtol=1e-9, atol=1e-12)
