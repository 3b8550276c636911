"""FlowModel / ConditionalFlowModel: a density users can hold, move and save."""

from __future__ import annotations

import io

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_nf import ConditionalFlowModel, FlowModel
from pyro_nf.transforms import conditional_realnvp, iaf, maf, realnvp
from tests.contract import CallCounter, perturb


@pytest.fixture
def model() -> FlowModel:
    flow_model = FlowModel(maf(3, [16], 2), (3,))
    perturb(flow_model, 0.2)
    return flow_model


def test_log_prob_matches_the_pyro_distribution(model: FlowModel) -> None:
    x = torch.randn(7, 3)
    assert torch.allclose(model.log_prob(x), model.distribution.log_prob(x), atol=1e-6)
    assert torch.allclose(model(x), model.log_prob(x))


def test_sample_and_log_prob_is_one_pass_and_consistent() -> None:
    flow_model = FlowModel(iaf(3, [16], 2), (3,))
    perturb(flow_model, 0.2)
    counter = CallCounter(flow_model)
    x, log_p = flow_model.sample_and_log_prob((11,))
    assert counter.counts == [1, 1]
    assert x.shape == (11, 3) and log_p.shape == (11,)
    assert torch.allclose(flow_model.log_prob(x), log_p, atol=1e-5)


def test_sample_with_temperature(model: FlowModel) -> None:
    torch.manual_seed(3)
    cold = model.sample((5,), temperature=0.0)
    assert torch.allclose(cold, cold[:1].expand(5, 3))  # all samples are the image of z = 0
    assert not model.sample((5,)).requires_grad
    assert model.rsample((5,)).requires_grad


def test_to_double_and_state_dict_cover_base_and_flow(model: FlowModel) -> None:
    model.double()
    assert model.loc.dtype == torch.float64 and model.base_dist.mean.dtype == torch.float64
    x = torch.randn(4, 3, dtype=torch.float64)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = FlowModel(maf(3, [16], 2), (3,)).double()
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(other.log_prob(x), model.log_prob(x))
    assert {"loc", "scale"} <= set(model.state_dict())


def test_bad_data_is_reported(model: FlowModel) -> None:
    with pytest.raises(ValueError, match=r"data: expected .*\(3,\), got shape \(4, 2\)"):
        model.log_prob(torch.randn(4, 2))
    with pytest.raises(TypeError, match="floating-point"):
        model.log_prob(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="expected a Transform"):
        FlowModel("maf", (3,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="event_shape"):
        FlowModel(maf(3), ())


def test_flow_model_as_a_learned_prior_in_svi() -> None:
    prior = FlowModel(realnvp(2, [16], 2), (2,))
    data = torch.randn(20, 2) + 3.0

    def model(x: torch.Tensor) -> None:
        pyro.module("prior", prior)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior.distribution.expand([x.shape[0]]))
            pyro.sample("x", dist.Normal(z, 0.1).to_event(1), obs=x)

    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    losses = [svi.step(data) for _ in range(60)]
    assert sum(losses[-10:]) < sum(losses[:10])
    assert any(name.startswith("prior$$$flow") for name in pyro.get_param_store())


def test_conditional_flow_model_shapes_and_consistency() -> None:
    cond = ConditionalFlowModel(conditional_realnvp(2, 4, [16], 2), (2,), context_dim=4)
    perturb(cond, 0.2)
    context = torch.randn(5, 4)
    conditioned = cond.condition(context)
    x, log_p = conditioned.sample_and_log_prob((3,))
    assert x.shape == (3, 5, 2) and log_p.shape == (3, 5)
    assert torch.allclose(cond.log_prob(x, context), log_p, atol=1e-5)
    assert torch.allclose(conditioned.distribution.log_prob(x), log_p, atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        cond.condition(torch.randn(5, 3))
