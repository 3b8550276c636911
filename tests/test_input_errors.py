"""Bad input to the library gets a ValueError / TypeError that names what was expected, at the call that got it."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_nf.distributions import ConditionalFlowModel, FlowModel
from pyro_nf.transforms import conditional_maf, conditional_realnvp, ffjord, glow, iaf, maf, realnvp


def test_a_flow_built_for_another_event_shape() -> None:
    with pytest.raises(ValueError, match=r"the flow works on events of shape \(3,\), but the model's event_shape is"):
        FlowModel(maf(3), (4,))
    with pytest.raises(ValueError, match=r"shape \(1, 4, 4\), but the model's event_shape is \(1, 8, 8\)"):
        FlowModel(glow((1, 4, 4), 1, 1, 4), (1, 8, 8))
    with pytest.raises(ValueError, match=r"the flow works on events of shape \(2,\)"):
        ConditionalFlowModel(conditional_maf(2, 3, hidden_dims=[8]), (5,), context_dim=3)


def test_a_context_whose_batch_does_not_broadcast() -> None:
    model = ConditionalFlowModel(conditional_maf(2, 3, hidden_dims=[8]), (2,), context_dim=3)
    with pytest.raises(ValueError, match=r"batch shape \(5,\) does not broadcast with the context's batch shape"):
        model.log_prob(torch.randn(5, 2), torch.randn(4, 3))
    assert model.log_prob(torch.randn(5, 2), torch.randn(3)).shape == (5,)  # one context for all


@pytest.mark.parametrize(
    "name, model, shape",
    [
        ("maf", lambda: FlowModel(maf(2, hidden_dims=[8]), (2,)), (0, 2)),
        ("realnvp", lambda: FlowModel(realnvp(2, hidden_dims=[8]), (2,)), (0, 2)),
        ("ffjord", lambda: FlowModel(ffjord(2, hidden_dims=[8]), (2,)), (0, 2)),
        ("glow", lambda: FlowModel(glow((1, 4, 4), 1, 1, 4), (1, 4, 4)), (0, 1, 4, 4)),
        ("glow, a batch of none", lambda: FlowModel(glow((1, 4, 4), 1, 1, 4), (1, 4, 4)), (3, 0, 1, 4, 4)),
    ],
)
def test_an_empty_batch_has_an_empty_log_prob(name: str, model: object, shape: tuple[int, ...]) -> None:
    flow_model = model()  # type: ignore[operator]
    log_p = flow_model.log_prob(torch.randn(shape))
    assert log_p.shape == shape[: len(shape) - len(flow_model.event_shape)] and log_p.dtype == torch.float32
    x, log_q = flow_model.sample_and_log_prob((0,))
    assert x.shape == (0, *flow_model.event_shape) and log_q.shape == (0,)


def test_an_empty_conditional_batch() -> None:
    model = ConditionalFlowModel(conditional_maf(2, 3, hidden_dims=[8]), (2,), context_dim=3)
    assert model.log_prob(torch.randn(0, 2), torch.randn(0, 3)).shape == (0,)


@pytest.mark.parametrize("factory", [maf, iaf, realnvp])
def test_an_activation_given_by_name(factory: object) -> None:
    with pytest.raises(TypeError, match="activation: expected a module class such as torch.nn.ReLU .* string 'relu'"):
        factory(2, activation="relu")  # type: ignore[operator]
    with pytest.raises(TypeError, match="got an instance of Tanh"):
        factory(2, activation=torch.nn.Tanh())  # type: ignore[operator]
    assert factory(2, activation=torch.nn.Tanh) is not None  # type: ignore[operator]


@pytest.mark.parametrize("temperature", [-1.0, math.nan, math.inf])
def test_a_temperature_that_is_not_a_finite_non_negative_number(temperature: float) -> None:
    model = FlowModel(maf(2, hidden_dims=[8]), (2,))
    with pytest.raises(ValueError, match=f"temperature: expected a finite number >= 0, got {temperature}"):
        model.sample((3,), temperature=temperature)
    assert torch.isfinite(model.sample((3,), temperature=0.0)).all()


def test_sizes_that_build_nothing_sensible() -> None:
    with pytest.raises(ValueError, match="num_transforms: expected a positive int, got True"):
        maf(2, num_transforms=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_dim: a coupling flow splits its input in two and needs input_dim >= 2"):
        realnvp(1)
    with pytest.raises(ValueError, match=r"hidden_dims: expected a non-empty list of positive ints, got \[8, True\]"):
        maf(2, hidden_dims=[8, True])
    with pytest.raises(ValueError, match=r"hidden_dims: expected a non-empty list of positive ints, got \[True\]"):
        ffjord(2, hidden_dims=[True])
    with pytest.raises(ValueError, match=r"sample_shape: expected sizes >= 0, got \(-1,\)"):
        FlowModel(maf(2), (2,)).sample((-1,))
    # A conditional coupling flow over one dimension reads the context: it is a real flow.
    flow = conditional_realnvp(1, 2, hidden_dims=[8])
    assert flow.condition(torch.randn(4, 2))(torch.randn(4, 1)).shape == (4, 1)
