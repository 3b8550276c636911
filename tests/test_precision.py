"""Precision of the sequential direction after training on data of large scale, and the vector ActNorm behind it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyro.distributions as dist
import pytest
import torch
from torch import Tensor

from pyro_nf.core import FlowStack
from pyro_nf.transforms import ActNorm, iaf, maf
from pyro_nf.transforms import actnorm as make_actnorm

ROOT = Path(__file__).resolve().parent.parent
DIM = 6


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def trained(factory, scale: float, actnorm: bool, steps: int = 60, seed: int = 0) -> FlowStack:
    """A short float32 training of the NLL on fresh batches of ``N(0, I) * scale`` (Adam, lr 3e-2)."""
    torch.manual_seed(seed)
    flow = factory(DIM, [32, 32], 3, actnorm=actnorm)
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-2)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = torch.randn(128, DIM, generator=generator) * scale
        z, log_det = flow.inverse_and_log_det(x)
        loss = (0.5 * z.pow(2).sum(-1) + log_det).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return flow.eval()


def with_solver(flow: FlowStack, sequential: str) -> FlowStack:
    """``flow`` with the sequential direction of every MADE layer solved by ``sequential`` (in place)."""
    for part in flow.parts:
        if hasattr(part, "sequential"):
            part.sequential = sequential
    return flow


@torch.no_grad()
def round_trip(flow: FlowStack, x: Tensor) -> float:
    """Data to noise and back: MAF samples sequentially, IAF takes the density of data sequentially."""
    z, _ = flow.inverse_and_log_det(x)
    return rel_err(flow.forward_and_log_det(z)[0], x)


@pytest.mark.parametrize("scale", [1e2, 1e4])
@pytest.mark.parametrize("factory", [maf, iaf], ids=["maf-sampling", "iaf-density"])
def test_round_trip_after_training_on_scaled_data(factory, scale: float):
    """With the actnorm first on the data side, the float32 round trip stays at the data's rounding at any scale.

    The incremental pass is never less precise than the D-pass reference there.
    """
    flow = trained(factory, scale, actnorm=True)
    x = torch.randn(500, DIM, generator=torch.Generator().manual_seed(9)) * scale
    errors = {method: round_trip(with_solver(flow, method), x) for method in ("incremental", "reference")}
    assert errors["incremental"] <= errors["reference"], errors
    # 1e-4 is asked for; it sits at float32's rounding of the data (2^-22 = 2.4e-7 relative)
    assert errors["incremental"] <= 1e-6, errors
    # the same weights in float64 round-trip at float64's rounding: the learned map is well conditioned
    flow64 = with_solver(flow, "incremental").double()
    assert round_trip(flow64, x.double()) <= 1e-14


def test_actnorm_matches_the_unnormalised_flow_at_scale_one():
    """At scale 1 the actnorm changes little: both flows round-trip at float32's rounding."""
    x = torch.randn(500, DIM, generator=torch.Generator().manual_seed(9))
    for actnorm in (False, True):
        assert round_trip(trained(maf, 1.0, actnorm, steps=30), x) <= 1e-6


# -- the vector ActNorm --------------------------------------------------------------------------------------------
def test_initialises_to_zero_mean_unit_variance_on_the_first_training_batch():
    norm = ActNorm(4).double()
    assert not bool(norm.initialised)
    scales = torch.tensor([1e4, 1.0, 3e-3, 50.0])
    y = torch.randn(8, 32, 4, dtype=torch.float64) * scales + torch.tensor([5.0, -2.0, 0.0, 1e3])
    z, log_det = norm.inverse_and_log_det(y)  # statistics over both batch dimensions
    flat = z.reshape(-1, 4)
    assert bool(norm.initialised)
    assert flat.mean(0).abs().max().item() < 1e-12
    assert torch.allclose(flat.var(0, correction=0), torch.ones(4, dtype=torch.float64), atol=1e-12)
    assert log_det.shape == (8, 32)
    assert torch.allclose(log_det, y.reshape(-1, 4).std(0, correction=0).log().sum().expand(8, 32))
    # a second batch is not used: the layer is initialised once, then trained
    loc = norm.loc.detach().clone()
    norm.inverse_and_log_det(torch.randn(16, 4, dtype=torch.float64) * 7.0)
    assert torch.equal(norm.loc.detach(), loc)


def test_float32_statistics_are_computed_in_float64():
    """Data far from zero with a small spread: the one-pass float32 variance would lose the spread."""
    y = 1e4 + 0.01 * torch.randn(4096, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    norm = ActNorm(2)
    z, _ = norm.inverse_and_log_det(y.float())
    assert norm.loc.dtype == torch.float32
    expected = y.float().double().std(0, correction=0)
    assert torch.allclose(norm.log_scale.detach().double(), expected.log(), atol=1e-4)
    assert torch.allclose(z.double().std(0, correction=0), torch.ones(2, dtype=torch.float64), atol=1e-3)


def test_evaluation_mode_and_the_forward_direction_never_initialise():
    norm = ActNorm(3).eval()
    y = torch.randn(10, 3) * 5.0 + 2.0
    z, log_det = norm.inverse_and_log_det(y)
    assert not bool(norm.initialised) and torch.equal(z, y) and torch.equal(log_det, torch.zeros(10))
    norm.train()
    x, _ = norm.forward_and_log_det(y)
    assert not bool(norm.initialised) and torch.equal(x, y)


def test_a_constant_feature_is_only_centred():
    norm = ActNorm(2)
    y = torch.stack([torch.full((50,), 3.0), torch.randn(50)], dim=-1)
    z, log_det = norm.inverse_and_log_det(y)
    assert torch.isfinite(z).all() and torch.isfinite(log_det).all()
    assert norm.log_scale[0].item() == 0.0 and torch.equal(z[:, 0], torch.zeros(50))
    assert abs(z[:, 1].std(correction=0).item() - 1.0) < 1e-5


def test_state_dict_round_trip_keeps_it_initialised():
    norm = ActNorm(3)
    norm.inverse_and_log_det(torch.randn(64, 3) * 10.0 + 4.0)
    fresh = ActNorm(3)
    fresh.load_state_dict(norm.state_dict())
    assert bool(fresh.initialised)
    fresh.train()
    fresh.inverse_and_log_det(torch.randn(64, 3))  # must not initialise again
    assert torch.equal(fresh.loc, norm.loc) and torch.equal(fresh.log_scale, norm.log_scale)


def _perturbed(dim: int) -> ActNorm:
    norm = make_actnorm(dim).double().eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.loc.copy_(torch.randn(dim, generator=generator, dtype=torch.float64))
        norm.log_scale.copy_(torch.randn(dim, generator=generator, dtype=torch.float64))
    return norm


def test_round_trip_and_log_det_against_the_autograd_jacobian():
    norm = _perturbed(4)
    x = torch.randn(5, 4, dtype=torch.float64)
    y, log_det = norm.forward_and_log_det(x)
    x_back, log_det_back = norm.inverse_and_log_det(y)
    assert torch.allclose(x_back, x, atol=1e-13) and torch.allclose(log_det_back, log_det, atol=1e-13)
    for i in range(5):
        jacobian = torch.autograd.functional.jacobian(lambda v: norm.forward_and_log_det(v)[0], x[i])
        assert torch.allclose(torch.linalg.slogdet(jacobian).logabsdet, log_det[i], atol=1e-12)


def test_density_in_pyro_and_gradients():
    """As the data-side layer of a TransformedDistribution: log_prob initialises it, and training reaches it."""
    flow = maf(3, [16], 2, actnorm=True)
    base = dist.Normal(torch.zeros(3), 1.0).to_event(1)
    model = dist.TransformedDistribution(base, [flow])
    x = torch.randn(64, 3) * 1e3
    loss = -model.log_prob(x).mean()
    norm = flow.parts[-1]
    assert bool(norm.initialised)
    loss.backward()
    assert norm.loc.grad is not None and norm.log_scale.grad is not None
    assert torch.isfinite(loss) and loss.item() < 3 * 1.42 + 3 * 6.91 + 1.0  # ~ the NLL of N(0, 1e6 I)


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="input_dim: expected a positive int, got 0"):
        ActNorm(0)
    with pytest.raises(ValueError, match="input_dim: expected a positive int, got True"):
        make_actnorm(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps: expected a positive number, got 0.0"):
        ActNorm(3, eps=0.0)
    with pytest.raises(ValueError, match="eps: expected a positive number, got 'small'"):
        ActNorm(3, eps="small")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache_size"):
        ActNorm(3, cache_size=2)
    with pytest.raises(ValueError, match="3"):
        ActNorm(3)(torch.randn(4, 5))


def test_benchmark_smoke():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "precision.py"), "--smoke-test", "--diagnose"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    for row in ("| MAF | 10000 | incremental |", "| IAF | 10000 | reference |", "| RealNVP | 1 | one pass |"):
        assert row in result.stdout
    assert "network in f64" in result.stdout and "round trip f32, actnorm" in result.stdout
