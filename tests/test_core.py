"""The one-pass contract's own mechanics, beyond what every transform is checked for."""

from __future__ import annotations

import copy
import io

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import ComposeTransformModule
from pyro.distributions.transforms import AffineTransform, affine_autoregressive

import pyro_nf
from pyro_nf.checks import check_tensor
from pyro_nf.core import FlowStack, InverseTransformModule
from pyro_nf.transforms import iaf, maf, realnvp
from tests.contract import CallCounter, perturb


def normal(dim: int) -> dist.TorchDistribution:
    return dist.Normal(torch.zeros(dim), 1.0).to_event(1)


def test_pyro_builtin_goes_stale_where_ours_does_not() -> None:
    """Scoring one data tensor across optimizer steps: Pyro's cache breaks, ours recomputes."""
    x = torch.randn(64, 3)

    def train(transform: torch.distributions.Transform, module: torch.nn.Module) -> None:
        d = dist.TransformedDistribution(normal(3), [transform])
        opt = torch.optim.Adam(module.parameters(), lr=0.01)
        for _ in range(2):
            opt.zero_grad()
            (-d.log_prob(x).mean()).backward()
            opt.step()

    builtin = affine_autoregressive(3)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        train(builtin.inv, builtin)
    ours = maf(3, [16])
    train(ours, ours)


def test_cache_size_zero_costs_two_passes() -> None:
    flow = FlowStack(list(maf(3, [8], 2).parts), cache_size=0)
    counter = CallCounter(flow)
    dist.TransformedDistribution(normal(3), [flow]).log_prob(torch.randn(5, 3))
    assert counter.counts == [2, 2]


def test_kept_log_det_is_served_once() -> None:
    flow = maf(3, [8], 2)
    perturb(flow, 0.3)
    counter = CallCounter(flow)
    x = torch.randn(5, 3)
    z = flow.inv(x)
    first = flow.log_abs_det_jacobian(z, x)
    second = flow.log_abs_det_jacobian(z, x)  # recomputed, not served again
    assert torch.allclose(first, second)
    assert counter.counts == [2, 2]


def test_kept_value_not_served_after_a_parameter_change() -> None:
    flow = iaf(2, [8], 1)
    z = torch.randn(4, 2)
    y0 = flow(z)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5)
    y1 = flow(z)
    assert not torch.allclose(y0, y1)
    assert torch.allclose(y1, flow.forward_and_log_det(z)[0])


def test_kept_value_not_served_across_grad_modes() -> None:
    flow = iaf(2, [8], 1)
    z = torch.randn(4, 2)
    with torch.no_grad():
        flow(z)
    assert flow(z).requires_grad


def test_mixed_stack_with_a_plain_pyro_transform() -> None:
    affine = AffineTransform(torch.tensor([1.0, -2.0]), torch.tensor([2.0, 0.5]), event_dim=1)
    stack = FlowStack([maf(2, [8], 1), affine, realnvp(2, [8], 2)])
    perturb(stack, 0.2)
    stack.double()
    x = torch.randn(6, 2, dtype=torch.float64)
    y, log_det = stack.forward_and_log_det(x)
    x_back, log_det_back = stack.inverse_and_log_det(y)
    assert torch.allclose(x_back, x, atol=1e-8) and torch.allclose(log_det, log_det_back, atol=1e-8)
    jac = torch.autograd.functional.jacobian(lambda v: stack.forward_and_log_det(v)[0], x[0])
    assert torch.allclose(torch.linalg.slogdet(jac)[1], log_det[0], atol=1e-8)


def test_inverse_keeps_parameters_in_compose_and_pyro_module() -> None:
    flow = maf(3, [8], 2)
    composed = ComposeTransformModule([flow.inv])
    assert len(list(composed.parameters())) == len(list(flow.parameters())) > 0
    pyro.module("inverse_flow", flow.inv)
    assert len(pyro.get_param_store()) == len(list(flow.parameters()))
    assert isinstance(flow.inv, InverseTransformModule) and flow.inv.inv is flow


def test_inverse_shares_the_kept_pair_with_its_base() -> None:
    flow = maf(3, [8], 2)
    counter = CallCounter(flow)
    d = dist.TransformedDistribution(normal(3), [flow.inv])  # an IAF-like direction: sampling is parallel
    d.log_prob(d.rsample((5,)))
    assert counter.counts == [1, 1]


def test_deepcopy_and_pickle_drop_the_kept_pair() -> None:
    flow = iaf(3, [8], 2)
    flow(torch.randn(2, 3))
    clone = copy.deepcopy(flow)
    assert clone._kept is None
    buffer = io.BytesIO()
    torch.save(flow, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    z = torch.randn(2, 3)
    assert torch.equal(loaded(z), flow.forward_and_log_det(z)[0])


def test_validation_can_be_switched_off() -> None:
    flow = maf(2, [8], 1)
    bad = torch.tensor([[float("nan"), 0.0]])
    with pytest.raises(ValueError, match="finite"):
        flow.inv(bad)
    with pyro_nf.validation(False):
        assert torch.isnan(flow.inv(bad)).any()
    assert pyro_nf.validation_enabled()


def test_check_tensor_messages() -> None:
    with pytest.raises(TypeError, match="expected a torch.Tensor, got list"):
        check_tensor([1.0], name="x")
    with pytest.raises(ValueError, match=r"trailing \(event\) shape is \(3,\), got shape \(2,\)"):
        check_tensor(torch.zeros(2), name="x", event_shape=(3,))


def test_with_cache_and_cache_size_are_validated() -> None:
    flow = maf(2, [8], 1)
    assert flow.with_cache(1) is flow
    with pytest.raises(ValueError, match="cache_size"):
        flow.with_cache(0)
    with pytest.raises(ValueError, match="cache_size"):
        FlowStack([], cache_size=2)


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        (maf, {"input_dim": 0}, "input_dim"),
        (maf, {"input_dim": 3, "num_transforms": 0}, "num_transforms"),
        (maf, {"input_dim": 3, "permutation": "shuffle"}, "permutation"),
        (maf, {"input_dim": 3, "scale": "exp"}, "scale"),
        (maf, {"input_dim": 3, "hidden_dims": []}, "hidden_dims"),
        (maf, {"input_dim": 3, "hidden_dims": [8, 16], "residual": True}, "equal widths"),
        (realnvp, {"input_dim": 3, "mask": "diagonal"}, "mask"),
        (realnvp, {"input_dim": 3, "log_scale_bound": 0.0}, "log_scale_bound"),
    ],
)
def test_bad_factory_arguments(factory, kwargs, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


def test_auto_normalizing_flow_takes_the_factories_unchanged() -> None:
    from functools import partial

    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormalizingFlow

    def model() -> None:
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(), 0.5), obs=torch.tensor(1.0))

    guide = AutoNormalizingFlow(model, partial(iaf, hidden_dims=[16], num_transforms=2))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert len(pyro.get_param_store()) > 0


def test_unknown_factory_option_is_named() -> None:
    with pytest.raises(TypeError, match=r"maf: unknown option\(s\) \['hiden'\]"):
        maf(3, hiden=[8])  # type: ignore[call-arg]
