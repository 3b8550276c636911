"""FFJORD beyond the shared contract: trace estimators, adjoint gradients, NFE, RNODE, options."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import Tensor, nn
from torchdiffeq import odeint

from pyro_nf.nn.divergence import AugmentedDynamics, divergence_exact, divergence_hutchinson, sample_noise
from pyro_nf.nn.odefunc import ConcatSquashLinear, ODENet
from pyro_nf.transforms import FFJORD, ConditionalFFJORD, ODEOptions, conditional_ffjord, ffjord
from tests.contract import CallCounter, perturb

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Many tiny ops per ODE step: one intra-op thread is fastest and immune to a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _base(dim: int, dtype: torch.dtype = F64) -> dist.TorchDistribution:
    return dist.Normal(torch.zeros(dim, dtype=dtype), 1.0).to_event(1)


def _flow(dim: int = 2, **kwargs: object) -> FFJORD:
    kwargs.setdefault("zero_init", False)
    flow = ffjord(dim, [16, 16], **kwargs)  # type: ignore[arg-type]
    perturb(flow, 0.2)
    return flow.to(F64)


class _Linear(nn.Module):
    """``f(z) = A z``: a field with a constant Jacobian."""

    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        return z @ self.a.T


# -- divergence estimators ----------------------------------------------------------


def test_exact_divergence_matches_the_autograd_jacobian() -> None:
    net = ODENet(3, [16], zero_init=False).to(F64)
    z = torch.randn(4, 3, dtype=F64, requires_grad=True)
    t = torch.tensor(0.3, dtype=F64)
    trace, frob = divergence_exact(net(t, z), z, create_graph=False)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: net(t, v), z[i].detach())
        assert torch.allclose(trace[i], jac.trace(), atol=1e-12)
        assert torch.allclose(frob[i], jac.square().sum(), atol=1e-12)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_for_one_evaluation(noise: str) -> None:
    net = ODENet(3, [16], zero_init=False).to(F64)
    perturb(net, 0.3)
    t = torch.tensor(0.5, dtype=F64)
    draws = 4000
    z = torch.randn(1, 3, dtype=F64).expand(draws, 3).clone().requires_grad_(True)
    f = net(t, z)
    exact_trace, exact_frob = divergence_exact(f, z, create_graph=False)
    trace, frob = divergence_hutchinson(f, z, sample_noise(noise, z), create_graph=False)  # type: ignore[arg-type]
    for estimate, exact in ((trace, exact_trace[0]), (frob, exact_frob[0])):
        assert estimate.std() > 0  # a real estimate, not the exact value
        standard_error = estimate.std() / math.sqrt(draws)
        assert abs(estimate.mean() - exact) <= 3 * standard_error, (estimate.mean(), exact, standard_error)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_log_det_of_a_solve_is_unbiased(noise: str) -> None:
    # Every row of the batch is the same point with its own noise: one solve gives many draws.
    flow = _flow(2, noise=noise, rtol=1e-7, atol=1e-7)
    draws = 2000
    x = torch.randn(1, 2, dtype=F64)
    flow.eval()
    with torch.no_grad():
        _, exact = flow.forward_and_log_det(x)  # evaluation mode at D = 2: the exact trace
        flow.train()
        y, estimates = flow.forward_and_log_det(x.expand(draws, 2))
    assert torch.allclose(y, y[:1].expand_as(y), atol=1e-6)  # the path does not depend on the noise
    standard_error = estimates.std() / math.sqrt(draws)
    assert estimates.std() > 1e-3
    assert abs(estimates.mean() - exact[0]) <= 3 * standard_error, (estimates.mean(), exact, standard_error)


def test_the_noise_is_fixed_for_the_whole_solve() -> None:
    # With a constant Jacobian A, a fixed probe e gives exactly t1 * eᵀAe (and ‖eᵀA‖² for RNODE's term).
    a = torch.tensor([[0.3, -0.5], [0.2, -0.1]], dtype=F64)
    z0 = torch.randn(64, 2, dtype=F64)
    noise = sample_noise("rademacher", z0)
    dynamics = AugmentedDynamics(_Linear(a), "hutchinson", noise, regularize=True)
    zeros = torch.zeros(64, dtype=F64)
    times = torch.tensor([0.0, 1.5], dtype=F64)
    with torch.no_grad():
        z, log_det, kinetic, jac = (
            s[-1] for s in odeint(dynamics, (z0, zeros, zeros, zeros), times, rtol=1e-9, atol=1e-9)
        )
    assert torch.allclose(log_det, 1.5 * ((noise @ a) * noise).sum(-1), atol=1e-7)
    assert torch.allclose(jac, 1.5 * (noise @ a).square().sum(-1), atol=1e-7)
    assert torch.allclose(z, z0 @ torch.linalg.matrix_exp(1.5 * a).T, atol=1e-7)
    assert dynamics.calls > 0


# -- the transform ------------------------------------------------------------------


def test_evaluation_mode_uses_the_exact_trace_by_default() -> None:
    flow = _flow(2)
    x = torch.randn(5, 2, dtype=F64)
    with torch.no_grad():
        train_a = flow.inverse_and_log_det(x)[1]
        train_b = flow.inverse_and_log_det(x)[1]
        flow.eval()
        eval_a = flow.inverse_and_log_det(x)[1]
        eval_b = flow.inverse_and_log_det(x)[1]
        flow.options = ODEOptions(trace="exact")
        flow.train()
        exact = flow.inverse_and_log_det(x)[1]
    assert not torch.allclose(train_a, train_b)  # Hutchinson: a new probe per solve
    assert torch.equal(eval_a, eval_b)
    assert torch.allclose(eval_a, exact, atol=1e-4)


def test_evaluation_solver_settings_are_separate() -> None:
    flow = _flow(2, solver="rk4", step_size=0.25, eval_solver="rk4", eval_step_size=0.1)
    x = torch.randn(3, 2, dtype=F64)
    flow.inverse_and_log_det(x)
    assert flow.nfe == 4 * 4  # four RK4 steps of four evaluations
    flow.eval()
    flow.inverse_and_log_det(x)
    assert flow.nfe == 10 * 4


def test_nfe_is_counted_in_both_directions_and_in_the_adjoint_solve() -> None:
    flow = _flow(2, trace="exact")
    counter = CallCounter(flow)
    assert len(counter.nets) == 1
    y, _ = flow.forward_and_log_det(torch.randn(8, 2, dtype=F64))
    assert flow.nfe == flow.nfe_forward == counter.counts[0] > 0
    assert flow.nfe_adjoint == 0  # no backward pass yet
    counter.reset()
    _, log_det = flow.inverse_and_log_det(torch.randn(8, 2, dtype=F64))
    assert flow.nfe == flow.nfe_inverse == counter.counts[0] > 0
    counter.reset()
    log_det.sum().backward()
    assert flow.nfe_adjoint == counter.counts[0] > 0
    # through the solver: no adjoint solve
    direct = _flow(2, trace="exact", adjoint=False)
    direct.inverse_and_log_det(torch.randn(8, 2, dtype=F64))[1].sum().backward()
    assert direct.nfe_inverse > 0 and direct.nfe_adjoint == 0
    # tighter tolerances cost more evaluations
    tight = _flow(2, trace="exact", rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        tight.inverse_and_log_det(torch.randn(8, 2, dtype=F64))
    assert tight.nfe > flow.nfe_inverse
    counter.close()


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_adjoint_and_direct_gradients_agree(trace: str) -> None:
    common = dict(trace=trace, rtol=1e-9, atol=1e-9, train_t1=True, kinetic_energy=0.1, jacobian_norm=0.1)
    torch.manual_seed(0)
    adjoint = conditional_ffjord(2, 3, [16, 16], adjoint=True, **common)  # type: ignore[arg-type]
    direct = conditional_ffjord(2, 3, [16, 16], adjoint=False, **common)  # type: ignore[arg-type]
    perturb(adjoint, 0.2)
    direct.load_state_dict(adjoint.state_dict())
    adjoint.to(F64)
    direct.to(F64)
    x = torch.randn(6, 2, dtype=F64)
    grads = []
    for flow in (adjoint, direct):
        context = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        torch.manual_seed(5)  # the same Hutchinson probes
        d = dist.TransformedDistribution(_base(2), [flow.condition(context)])
        loss = -d.log_prob(x).mean() + flow.regularization()
        params = list(flow.parameters())
        grads.append(torch.autograd.grad(loss, [*params, context]))
    assert adjoint.nfe_adjoint > 0
    names = [n for n, _ in adjoint.named_parameters()] + ["context"]
    assert "end_time.sqrt_t1" in names
    for name, ga, gd in zip(names, *grads):
        assert torch.allclose(ga, gd, rtol=1e-5, atol=1e-7), (name, (ga - gd).abs().max())
        assert ga.abs().sum() > 0, name


def test_rnode_terms_are_exact_on_trivial_fields() -> None:
    # The zero field: no motion, no Jacobian.
    flow = ffjord(2, [8], trace="exact", kinetic_energy=1.0, jacobian_norm=1.0).to(F64)
    flow.forward_and_log_det(torch.randn(5, 2, dtype=F64))
    assert flow.kinetic_energy is not None and flow.jacobian_norm is not None
    assert flow.kinetic_energy.shape == (5,)
    assert flow.kinetic_energy.abs().max() == 0 and flow.jacobian_norm.abs().max() == 0
    # f = c t (the last layer's time shift only): ∫₀^{t1} ‖c t‖² dt = ‖c‖² t1³ / 3, Jacobian zero.
    flow = ffjord(2, [8], trace="exact", t1=1.5, kinetic_energy=1.0, jacobian_norm=2.0).to(F64)
    c = torch.tensor([0.7, -1.2], dtype=F64)
    with torch.no_grad():
        flow.net.layers[-1].shift.weight[:, 0] = c
    x = torch.randn(5, 2, dtype=F64)
    y, log_det = flow.forward_and_log_det(x)
    kinetic = c.square().sum() * 1.5**3 / 3
    assert torch.allclose(flow.kinetic_energy, kinetic.expand(5), rtol=1e-6)
    assert flow.jacobian_norm.abs().max() < 1e-12
    assert torch.allclose(flow.regularization(), kinetic, rtol=1e-6)
    assert torch.allclose(y, x + c * 1.5**2 / 2, atol=1e-6) and log_det.abs().max() < 1e-12
    # the inverse solve integrates the same (positive) quantities
    flow.inverse_and_log_det(y)
    assert torch.allclose(flow.kinetic_energy, kinetic.expand(5), rtol=1e-6)
    # not integrated in evaluation mode
    flow.eval()
    flow.forward_and_log_det(x)
    assert flow.kinetic_energy is None and flow.regularization() == 0


def test_rnode_penalty_shrinks_the_field_when_the_data_is_the_base() -> None:
    # Data already distributed as the base: the identity is optimal, and RNODE drives the field to rest.
    torch.manual_seed(0)
    flow = ffjord(2, [8, 8], solver="rk4", step_size=0.5, kinetic_energy=1.0, jacobian_norm=1.0, adjoint=False)
    perturb(flow, 1.0)
    data = torch.randn(64, 2)
    d = dist.TransformedDistribution(_base(2, torch.float32), [flow])
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    history = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = -d.log_prob(data).mean() + flow.regularization()
        loss.backward()
        optimizer.step()
        assert flow.kinetic_energy is not None and flow.jacobian_norm is not None
        assert torch.isfinite(flow.kinetic_energy).all() and torch.isfinite(flow.jacobian_norm).all()
        history.append((flow.kinetic_energy.mean().item(), flow.jacobian_norm.mean().item()))
    (k0, j0), (k1, j1) = history[0], history[-1]
    assert k1 < 0.3 * k0 and j1 < 0.3 * j0, history[:: len(history) // 4]


def test_rnode_penalty_goes_into_a_guide_with_pyro_factor() -> None:
    flow = ffjord(2, [8], trace="exact", zero_init=False, kinetic_energy=0.5, jacobian_norm=0.5)
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    penalties: list[float] = []

    def model() -> None:
        z = pyro.sample("z", base)
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=torch.ones(2))

    def guide(with_factor: bool) -> None:
        pyro.module("flow", flow)
        pyro.sample("z", dist.TransformedDistribution(base, [flow]))
        penalty = flow.regularization()
        penalties.append(penalty.item())
        if with_factor:
            pyro.factor("rnode", penalty, has_rsample=True)

    elbo = Trace_ELBO()
    losses = []
    for with_factor in (False, True):
        torch.manual_seed(3)
        losses.append(elbo.loss(model, lambda w=with_factor: guide(w)))
    assert penalties[0] == penalties[1] > 0
    assert losses[1] - losses[0] == pytest.approx(penalties[1], rel=1e-5)
    svi = SVI(model, lambda: guide(True), Adam({"lr": 0.01}), elbo)
    assert math.isfinite(svi.step())


def test_regularizers_stay_out_of_the_error_control() -> None:
    x = torch.randn(16, 2, dtype=F64)
    results = []
    for weights in ({}, {"kinetic_energy": 1.0, "jacobian_norm": 1.0}):
        torch.manual_seed(0)  # the same network
        flow = _flow(2, trace="exact", **weights)
        y, log_det = flow.forward_and_log_det(x)
        results.append((flow.nfe, y, log_det, flow.kinetic_energy))
    assert results[0][3] is None and results[1][3] is not None
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])


def test_learned_end_time_gets_the_right_gradient() -> None:
    flow = _flow(2, trace="exact", t1=0.5, train_t1=True, rtol=1e-10, atol=1e-10)
    x = torch.randn(4, 2, dtype=F64)
    flow.inverse_and_log_det(x)[1].sum().backward()
    sqrt_t1 = flow.end_time.sqrt_t1
    assert flow.end_time().item() == pytest.approx(sqrt_t1.item() ** 2)
    assert sqrt_t1.grad is not None and sqrt_t1.grad.abs() > 0
    h, values = 1e-5, []
    with torch.no_grad():
        for step in (h, -h):
            sqrt_t1.add_(step)
            values.append(flow.inverse_and_log_det(x)[1].sum())
            sqrt_t1.sub_(step)
    assert sqrt_t1.grad.item() == pytest.approx(((values[0] - values[1]) / (2 * h)).item(), rel=1e-4)


def test_conditional_ffjord_broadcasts_context_and_batch() -> None:
    flow = conditional_ffjord(2, 3, [8], zero_init=False).to(F64)
    perturb(flow, 0.2)
    flow.eval()
    context = torch.randn(4, 1, 3, dtype=F64)
    y, log_det = flow.condition(context).forward_and_log_det(torch.randn(5, 2, dtype=F64))
    assert y.shape == (4, 5, 2) and log_det.shape == (4, 5)
    one = flow.condition(context[1, 0]).forward_and_log_det(torch.zeros(2, dtype=F64))
    row = flow.condition(context[1]).forward_and_log_det(torch.zeros(5, 2, dtype=F64))
    assert torch.allclose(one[0], row[0][2], atol=1e-5) and torch.allclose(one[1], row[1][2], atol=1e-5)
    assert flow.nfe > 0  # the conditioned transforms report to their module


def test_concat_squash_layer_formula() -> None:
    layer = ConcatSquashLinear(3, 4, context_dim=2).to(F64)
    x, c, t = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64), torch.tensor(0.7, dtype=F64)
    h = torch.cat([t.expand(5, 1), c], -1)
    gate = torch.sigmoid(h @ layer.gate.weight.T + layer.gate.bias)
    expected = (x @ layer.linear.weight.T + layer.linear.bias) * gate + h @ layer.shift.weight.T
    assert torch.allclose(layer(t, x, c), expected)
    with pytest.raises(ValueError, match="context"):
        layer(t, x)


@pytest.mark.parametrize("context_shape", [None, (5, 2), (1, 2)])
def test_fused_field_equals_its_layers_one_by_one(context_shape: tuple[int, ...] | None) -> None:
    # ODENet computes all gates and shifts in one map (and folds a batch-wide gate into the weights);
    # it must equal the layers applied one by one, values and gradients, parameters unchanged.
    context_dim = 0 if context_shape is None else context_shape[-1]
    net = ODENet(3, [6, 5], context_dim, "tanh", zero_init=False).to(F64)
    kinds = ("linear.weight", "linear.bias", "gate.weight", "gate.bias", "shift.weight")
    assert sorted(net.state_dict()) == sorted(f"layers.{i}.{kind}" for i in range(3) for kind in kinds)
    z = torch.randn(5, 3, dtype=F64, requires_grad=True)
    c = None if context_shape is None else torch.randn(context_shape, dtype=F64)
    t = torch.tensor(0.3, dtype=F64)

    def one_by_one(z: Tensor) -> Tensor:
        h = z
        for layer, act in zip(net.layers, net.activations):
            h = act(layer(t, h, c))
        return net.layers[-1](t, h, c)

    fused, reference = net(t, z, c), one_by_one(z)
    assert (fused - reference).abs().max() <= 1e-12
    params = [z, *net.parameters()]
    for a, b in zip(torch.autograd.grad(fused.sin().sum(), params), torch.autograd.grad(reference.sin().sum(), params)):
        assert (a - b).abs().max() <= 1e-12


def test_state_survives_pickling_of_the_module() -> None:
    import copy

    flow = _flow(2, trace="exact", kinetic_energy=1.0)
    flow.forward_and_log_det(torch.randn(3, 2, dtype=F64))
    clone = copy.deepcopy(flow)
    assert clone.nfe == 0
    x = torch.randn(3, 2, dtype=F64)
    assert torch.allclose(clone.forward_and_log_det(x)[0], flow.forward_and_log_det(x)[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"solver": "rk45"}, r"solver: expected one of \['dopri5'"),
        ({"trace": "approx"}, r"trace: expected one of \['exact', 'hutchinson'\]"),
        ({"noise": "uniform"}, r"noise: expected one of \['rademacher', 'gaussian'\]"),
        ({"eval_trace": "none"}, r"eval_trace: expected one of \['auto', 'exact', 'hutchinson'\]"),
        ({"eval_solver": "foo"}, r"eval_solver: expected one of"),
        ({"adjoint_norm": "l2"}, r"adjoint_norm: expected one of \['seminorm', 'mixed'\]"),
        ({"rtol": -1.0}, "rtol: expected a positive number"),
        ({"atol": float("nan")}, "atol: expected a positive number"),
        ({"step_size": 0.1}, "step_size: applies to fixed-grid solvers"),
        ({"solver": "rk4", "step_size": 0.0}, "step_size: expected a positive number"),
        ({"kinetic_energy": -0.1}, "kinetic_energy: expected a non-negative number"),
        ({"max_num_steps": 0}, "max_num_steps: expected a positive int"),
        ({"adjoint": "yes"}, "adjoint: expected True or False"),
        ({"t1": 0.0}, "t1: expected a positive number"),
        ({"activation": "relu"}, r"activation: expected one of \['elu', 'silu', 'softplus', 'tanh'\]"),
        ({"tolerance": 1e-3}, r"unknown FFJORD option\(s\) \['tolerance'\]; expected some of \['trace'"),
        ({"hidden_dims": []}, "hidden_dims: expected a non-empty list"),
    ],
)
def test_bad_options_get_a_clear_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ffjord(2, **kwargs)  # type: ignore[arg-type]


def test_bad_construction_gets_a_clear_error() -> None:
    with pytest.raises(ValueError, match="input_dim: expected a positive int"):
        ffjord(0)
    with pytest.raises(ValueError, match="context_dim: expected a positive int"):
        conditional_ffjord(2, 0)
    with pytest.raises(ValueError, match="use ConditionalFFJORD"):
        FFJORD(ODENet(2, [4], context_dim=1))
    with pytest.raises(ValueError, match="context_dim >= 1"):
        ConditionalFFJORD(ODENet(2, [4]))
    with pytest.raises(TypeError, match="ODENet"):
        FFJORD(nn.Linear(2, 2))  # type: ignore[arg-type]


def _benchmark(script: str, *args: str) -> str:
    """Run ``benchmarks/<script>`` with ``args``; its standard output (the run must succeed)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_benchmark_smoke_test_runs() -> None:
    out = _benchmark("ffjord.py", "--smoke-test")
    assert "pyro_nf" in out and "zuko" in out and "torchdiffeq" in out
    assert "| gmm8 | zuko |" in out  # the D = 8 known-density row
    # part 3: flow matching against maximum likelihood, at equal training time
    for run in ("maximum likelihood", "flow matching (independent)"):
        assert re.search(
            rf"\| moons \| {re.escape(run)} \| [\d.e-]+ \| \d+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| — \| \d+ \|", out
        ), run
    out = _benchmark("rnode.py", "--smoke-test", "--configs", "ffjord", "rk4-rnode-1", "--seeds", "0", "1")
    for seed in (0, 1):
        assert f"| 8gaussians | {seed} | ffjord | 2 |" in out
        # the pairwise table: rk4-rnode-1 against ffjord of the same seed, at a common NLL
        assert re.search(rf"\| 8gaussians \| {seed} \| rk4-rnode-1 \| [\d.]+ \| \d+ → \d+ \| [\d.]+x \|", out)


def test_overhead_benchmark_smoke_test_runs() -> None:
    out = _benchmark("ode_overhead.py", "--smoke-test")
    for row in ("torchdiffeq dopri5, one packed tensor", "zuko odeint", "pyro_nf ODENet, softplus", "zuko CNF field"):
        assert re.search(rf"\| {row}[^|]* \|( \d+ \|)? \d+\.\d{{3}} \|", out), row
