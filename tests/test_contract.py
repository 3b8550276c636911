"""The shared contract suite: every case in ``tests/contract.py`` goes through every check."""

from __future__ import annotations

import io
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import TransformModule
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_nf.core import FlowTransform
from pyro_nf.nn.made import MADE
from tests.contract import CASES, CallCounter, Case, condition, instantiate

pytestmark = pytest.mark.parametrize("case", CASES, ids=str)

ROUND_TRIP_TOL = 1e-6
LOG_DET_TOL = 1e-5


def base_of(shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> dist.TorchDistribution:
    return dist.Normal(torch.zeros(shape, dtype=dtype), 1.0).to_event(len(shape))


def flat_dim(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def test_round_trip(case: Case) -> None:
    inst = instantiate(case, batch=(7,))
    t = inst.transform
    x = torch.randn(7, *case.shape, dtype=torch.float64)
    y, log_det = t.forward_and_log_det(x)
    x_back, log_det_back = t.inverse_and_log_det(y)
    assert (x_back - x).abs().max() <= ROUND_TRIP_TOL
    assert (log_det_back - log_det).abs().max() <= ROUND_TRIP_TOL
    assert not torch.allclose(y, x), "the perturbed transform should not be the identity"
    # the same through Pyro's interface, on a fresh tensor (no cache hit)
    y2 = t(x.clone())
    assert torch.allclose(y2, y, atol=1e-12)
    assert (t.inv(y.clone()) - x).abs().max() <= ROUND_TRIP_TOL


def _jacobian_check(case: Case, shape: tuple[int, ...]) -> None:
    inst = instantiate(case, shape, batch=(3,))
    t = inst.transform
    x = torch.randn(3, *shape, dtype=torch.float64)
    _, log_det = t.forward_and_log_det(x)
    for i in range(3):
        ti = t if inst.context is None else inst.owner.condition(inst.context[i])  # type: ignore[operator]

        def f(v: torch.Tensor, ti=ti) -> torch.Tensor:
            return ti.forward_and_log_det(v.reshape(shape))[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(f, x[i].reshape(-1))
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0
        assert abs(logabsdet - log_det[i]) <= LOG_DET_TOL, (logabsdet.item(), log_det[i].item())
        # log_abs_det_jacobian on a pair it did not compute recomputes it
        xi = x[i].clone()
        yi = ti(xi.clone())
        assert abs(ti.log_abs_det_jacobian(xi, yi) - logabsdet) <= LOG_DET_TOL


def test_log_det_matches_autograd_jacobian(case: Case) -> None:
    _jacobian_check(case, case.shape)


def test_input_dim_one(case: Case) -> None:
    if not case.vector:
        pytest.skip("not a vector transform")
    if case.min_dim > 1:
        with pytest.raises(ValueError, match="input_dim: a coupling flow splits its input in two"):
            case.make((1,))
        return
    _jacobian_check(case, (1,))
    inst = instantiate(case, (1,), batch=(4,))
    x = torch.randn(4, 1, dtype=torch.float64)
    y, _ = inst.transform.forward_and_log_det(x)
    assert (inst.transform.inverse_and_log_det(y)[0] - x).abs().max() <= ROUND_TRIP_TOL


def test_autoregressive_layers_are_triangular(case: Case) -> None:
    if not case.autoregressive:
        pytest.skip("not autoregressive")
    inst = instantiate(case)
    layers = [m for m in inst.owner.modules() if isinstance(m, FlowTransform) and hasattr(m, "made")]
    assert layers
    x = torch.randn(case.shape, dtype=torch.float64)
    for layer in layers:
        made: MADE = layer.made
        jac = torch.autograd.functional.jacobian(lambda v, layer=layer: layer.forward_and_log_det(v)[0], x)
        degrees = made.degrees
        may_depend = degrees[None, :] <= degrees[:, None]  # output i on input j iff order(j) <= order(i)
        assert jac[~may_depend].abs().max() == 0
        assert jac.diagonal().abs().min() > 0


@pytest.mark.parametrize("batch", [(3,), (3, 4), (3, 4, 5)])
def test_batch_shapes(case: Case, batch: tuple[int, ...]) -> None:
    inst = instantiate(case, batch=batch)
    t = inst.transform
    x = torch.randn(*batch, *case.shape, dtype=torch.float64)
    y, log_det = t.forward_and_log_det(x)
    assert y.shape == batch + tuple(t.forward_shape(case.shape))
    assert log_det.shape == batch
    z, log_det_inv = t.inverse_and_log_det(y)
    assert z.shape == x.shape and tuple(t.inverse_shape(y.shape)) == x.shape
    assert log_det_inv.shape == batch
    assert t.log_abs_det_jacobian(x.clone(), y.clone()).shape == batch


def test_gradients_reach_every_parameter(case: Case) -> None:
    inst = instantiate(case, batch=(16,))
    inst.owner.train()
    d = dist.TransformedDistribution(base_of(case.shape), [inst.transform])
    x = torch.randn(16, *case.shape, dtype=torch.float64)
    (-d.log_prob(x).mean() - d.rsample((16,)).square().mean()).backward()
    for name, p in inst.owner.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_one_pass_per_layer(case: Case) -> None:
    inst = instantiate(case, batch=(8,))
    t = inst.transform
    counter = CallCounter(inst.owner)
    assert counter.nets or not case.networks
    d = dist.TransformedDistribution(base_of(case.shape), [t])

    def calls_per_pass() -> list[int]:
        calls = 1 if case.calls_per_pass is None else case.calls_per_pass(t)
        expected = [calls] * len(counter.nets) if isinstance(calls, int) else list(calls)
        assert len(expected) == len(counter.nets) and all(c >= 1 for c in expected), expected
        return expected

    if t.parallel in ("inverse", "both"):
        d.log_prob(torch.randn(8, *case.shape, dtype=torch.float64))
        assert counter.counts == calls_per_pass(), counter.counts
    if t.parallel in ("forward", "both"):
        counter.reset()
        x = d.rsample((8,)) if inst.context is None else d.rsample()
        d.log_prob(x)
        assert counter.counts == calls_per_pass(), counter.counts
    counter.close()


def test_no_stale_values_across_optimizer_steps(case: Case) -> None:
    inst = instantiate(case, batch=(32,), dtype=torch.float64)
    inst.owner.train()
    t = inst.transform
    d = dist.TransformedDistribution(base_of(case.shape), [t])
    x = torch.randn(32, *case.shape, dtype=torch.float64)
    opt = torch.optim.SGD(inst.owner.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        loss = -d.log_prob(x).mean()
        loss.backward()  # fails with a stale cache ("backward through the graph a second time")
        opt.step()
    inst.owner.eval()
    fresh = dist.TransformedDistribution(base_of(case.shape), [t]).log_prob(x.clone())
    assert torch.allclose(d.log_prob(x), fresh, atol=1e-10)
    # rsample, step, then log_prob of the same samples: recomputed under the new parameters
    inst.owner.train()
    y = d.rsample((4,)) if inst.context is None else d.rsample()
    d.log_prob(y).sum().backward()
    opt.step()
    inst.owner.eval()
    assert torch.allclose(d.log_prob(y), d.log_prob(y.detach().clone()), atol=1e-8)


def _svi(model, guide, owner, steps: int = 3) -> None:  # type: ignore[no-untyped-def]
    pyro.clear_param_store()
    before = [p.detach().clone() for p in owner.parameters()]
    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(steps):
        loss = svi.step()
        assert math.isfinite(loss)
    after = list(owner.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "SVI did not move the flow's parameters"


def test_svi_as_guide_and_as_prior(case: Case) -> None:
    inst = instantiate(case, batch=(), dtype=torch.float32, std=0.05)
    inst.owner.train()
    shape = case.shape
    base = dist.Normal(torch.zeros(shape), 1.0).to_event(len(shape))
    obs = torch.randn(shape)

    def model() -> None:
        z = pyro.sample("z", base)
        pyro.sample("x", dist.Normal(z, 1.0).to_event(len(shape)), obs=obs)

    def flow_guide() -> None:
        pyro.module("flow", inst.owner)
        pyro.sample("z", dist.TransformedDistribution(base, [inst.transform]))

    _svi(model, flow_guide, inst.owner)

    def flow_prior_model() -> None:
        pyro.module("flow", inst.owner)
        z = pyro.sample("z", dist.TransformedDistribution(base, [inst.transform]))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(len(shape)), obs=obs)

    def normal_guide() -> None:
        loc = pyro.param("loc", torch.zeros(shape))
        pyro.sample("z", dist.Normal(loc, 0.5).to_event(len(shape)))

    _svi(flow_prior_model, normal_guide, inst.owner)


def test_state_dict_round_trip(case: Case) -> None:
    inst = instantiate(case, batch=(6,), seed=1)
    buffer = io.BytesIO()
    torch.save(inst.owner.state_dict(), buffer)
    buffer.seek(0)
    fresh = case.make(case.shape).to(torch.float64).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    t2, _ = condition(case, fresh, (6,), torch.float64)
    if inst.context is not None:
        t2 = fresh.condition(inst.context)
    x = torch.randn(6, *case.shape, dtype=torch.float64)
    lp1 = dist.TransformedDistribution(base_of(case.shape), [inst.transform]).log_prob(x)
    lp2 = dist.TransformedDistribution(base_of(case.shape), [t2]).log_prob(x)
    assert torch.equal(lp1, lp2)


def test_dtype_conversion(case: Case) -> None:
    inst = instantiate(case, batch=(5,), dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in inst.owner.parameters())
    inst.owner.to(torch.float64)
    t, _ = condition(case, inst.owner, (5,), torch.float64)
    x = torch.randn(5, *case.shape, dtype=torch.float64)
    y, log_det = t.forward_and_log_det(x)
    assert y.dtype == torch.float64 and log_det.dtype == torch.float64
    assert all(b.device == x.device for b in inst.owner.buffers())


def test_density_integrates_to_one(case: Case) -> None:
    if not case.vector:
        pytest.skip("not a vector transform")
    inst = instantiate(case, (2,), batch=(), std=0.05)
    d = dist.TransformedDistribution(base_of((2,)), [inst.transform])
    grid = torch.linspace(-9.0, 9.0, 301, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx, yy], -1).reshape(-1, 2)
    with torch.no_grad():
        mass = d.log_prob(points).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(mass.item() - 1.0) <= 0.01


def test_inverse_is_a_transform_module_with_the_parameters(case: Case) -> None:
    if case.context_dim:
        pytest.skip("the conditioned transform owns no parameters")
    inst = instantiate(case)
    inverse = inst.transform.inv
    assert isinstance(inverse, TransformModule)
    assert {id(p) for p in inverse.parameters()} == {id(p) for p in inst.owner.parameters()}
    assert inverse.inv is inst.transform
    x = torch.randn(4, *case.shape, dtype=torch.float64)
    assert torch.allclose(inverse(x), inst.transform.inverse_and_log_det(x)[0])


def test_bad_input_gets_a_clear_error(case: Case) -> None:
    inst = instantiate(case, batch=(4,), dtype=torch.float32)
    t = inst.transform
    good = torch.randn(4, *case.shape)
    wrong_event = torch.randn(4, *case.shape[:-1], case.shape[-1] + 1)
    with pytest.raises(ValueError, match="expected .*shape"):
        t(wrong_event)
    with pytest.raises(ValueError, match="expected .*shape"):
        t.inv(wrong_event)
    with pytest.raises(TypeError, match="floating-point"):
        t(good.long())
    with pytest.raises(TypeError, match="dtype"):
        t(good.double())
    for bad in (float("nan"), float("inf")):
        x = good.clone()
        x[0].view(-1)[0] = bad
        with pytest.raises(ValueError, match="finite"):
            t(x)
        with pytest.raises(ValueError, match="finite"):
            t.inv(x)
    with pytest.raises(ValueError, match="device"):
        t(good.to("meta"))
    if case.context_dim:
        with pytest.raises(ValueError, match="context.*expected"):
            inst.owner.condition(torch.randn(4, case.context_dim + 1))  # type: ignore[operator]
        with pytest.raises(TypeError, match="floating-point"):
            inst.owner.condition(torch.ones(4, case.context_dim, dtype=torch.long))  # type: ignore[operator]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_numbers_on_cuda(case: Case) -> None:
    inst = instantiate(case, batch=(6,), seed=2)
    x = torch.randn(6, *case.shape, dtype=torch.float64)
    y, log_det = inst.transform.forward_and_log_det(x)
    inst.owner.to("cuda")
    if inst.context is None:
        t, _ = condition(case, inst.owner, (6,), torch.float64)
    else:  # the same context, moved along
        t = inst.owner.condition(inst.context.cuda())  # type: ignore[attr-defined]
    y_cuda, log_det_cuda = t.forward_and_log_det(x.cuda())
    assert y_cuda.device.type == log_det_cuda.device.type == "cuda"
    assert torch.allclose(y_cuda.cpu(), y, rtol=1e-6, atol=1e-6)
    assert torch.allclose(log_det_cuda.cpu(), log_det, rtol=1e-6, atol=1e-6)
    x_back, _ = t.inverse_and_log_det(y_cuda)
    assert (x_back.cpu() - x).abs().max() <= ROUND_TRIP_TOL
