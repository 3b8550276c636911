"""Neural spline flows: the factories' options, the tails, the layout of the parameters, both sequential methods,
and the entry points (registry, AutoFlow, amortized posterior, flow prior, image couplings).

The shared contract checks (round trip, log-det against the autograd Jacobian, batch shapes, SVI, save/load,
dtype) run on the spline cases of ``tests/contract.py``; these tests cover what is particular to splines.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam
from torch import Tensor

from pyro_nf.infer import AmortizedFlowPosterior, AutoFlow
from pyro_nf.nn import MADE
from pyro_nf.nn.nets import MLP
from pyro_nf.registry import FLOWS, flow_factory
from pyro_nf.transforms import (
    ConditionalSplineAutoregressive,
    ConditionalSplineCoupling,
    Coupling,
    RationalQuadraticSpline,
    SplineAutoregressive,
    SplineCoupling,
    conditional_nsf,
    coupling_mask,
    glow,
    image_coupling,
    nsf,
    realnvp_multiscale,
)
from tests.contract import CallCounter, perturb
from tests.test_infer import banana_model, run_svi


def _perturbed(module: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    perturb(module.double(), std)
    return module


def test_factory_options_are_checked() -> None:
    with pytest.raises(TypeError, match=r"nsf: unknown option\(s\) \['bin'\]"):
        nsf(3, bin=4)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"\['permutation'\] do not apply to coupling layers.*coupling=False"):
        nsf(3, coupling=True, permutation="random")
    with pytest.raises(TypeError, match=r"\['parallel'\] do not apply to coupling layers"):
        nsf(3, coupling=True, parallel="forward")
    with pytest.raises(TypeError, match=r"\['mask'\] do not apply to autoregressive layers.*coupling=True"):
        nsf(3, mask="alternate")
    with pytest.raises(TypeError, match="coupling: expected True or False"):
        nsf(3, coupling="yes")  # type: ignore[typeddict-item]
    with pytest.raises(ValueError, match="parallel"):
        nsf(3, parallel="both")  # type: ignore[typeddict-item]
    with pytest.raises(ValueError, match="bins: expected an int >= 2"):
        nsf(3, bins=1)
    with pytest.raises(ValueError, match="bound: expected a positive finite number"):
        conditional_nsf(3, 2, bound=-1.0)
    with pytest.raises(ValueError, match="context_dim"):
        conditional_nsf(3, 0)


def test_layers_and_directions() -> None:
    flow = nsf(4, [8], 3, bins=6)
    assert flow.parallel == "inverse" and len(flow.parts) == 3
    # the layers trained on the density of data map data to noise by the closed form (g^{-1} forward)
    assert all(part.elementwise == RationalQuadraticSpline(6, inverted=True) for part in flow.parts)
    assert all(part.made.num_params == 17 for part in flow.parts)
    iaf = nsf(4, [8], 2, parallel="forward")
    assert iaf.parallel == "forward" and all(part.elementwise == RationalQuadraticSpline() for part in iaf.parts)
    coupling = nsf(4, [8], 2, coupling=True, bound=2.0)
    assert coupling.parallel == "both" and all(isinstance(p, Coupling) for p in coupling.parts)
    assert coupling.parts[0].elementwise == RationalQuadraticSpline(bound=2.0, inverted=True)
    classes = (
        SplineAutoregressive(MADE(3, [8], num_params=23)),
        ConditionalSplineAutoregressive(MADE(3, [8], num_params=23, context_dim=2)),
        SplineCoupling(MLP(2, [8], 23 * 2), coupling_mask(4, 0)),
        ConditionalSplineCoupling(MLP(2, [8], 23 * 2, context_dim=2), coupling_mask(4, 0)),
    )
    assert all(layer.elementwise.inverted for layer in classes)
    assert not SplineAutoregressive(MADE(3, [8], num_params=23), "forward").elementwise.inverted
    made = MADE(3, [8], num_params=23, context_dim=2)
    assert not ConditionalSplineAutoregressive(made, "forward").elementwise.inverted


def test_the_density_of_data_takes_the_closed_form() -> None:
    """The MAF-direction layer's data-to-noise map is the spline ``g`` itself, evaluated by its closed form."""
    layer = _perturbed(SplineAutoregressive(MADE(3, [16], num_params=14), bins=5, bound=2.0))  # type: ignore[arg-type]
    x = torch.randn(32, 3, dtype=torch.float64)
    z, log_det = layer.inverse_and_log_det(x)
    params = layer._layout(layer.made(x))
    g = RationalQuadraticSpline(bins=5, bound=2.0)
    expected, ladj = g.forward(x, params)
    torch.testing.assert_close(z, expected, rtol=0, atol=0)
    torch.testing.assert_close(log_det, -ladj.sum(-1), rtol=0, atol=1e-12)
    assert len(nsf(4, [8], 2, actnorm=True).parts) == 3  # an ActNorm last, on the data side


def _tails_check(layer: torch.nn.Module, moved: Tensor, bound: float) -> None:
    """Entries outside ``[-bound, bound]`` pass unchanged both ways and add nothing to the log-det."""
    x = torch.randn(64, moved.numel(), dtype=torch.float64) * 3 * bound
    x[:8] = torch.tensor([-1e6, 1e6, -1.5 * bound, 2 * bound])[torch.arange(8 * moved.numel()) % 4].reshape(8, -1)
    y, log_det = layer.forward_and_log_det(x)
    tails = (x.abs() > bound) & moved
    assert tails.float().mean() > 0.3
    assert torch.equal(y[tails], x[tails])
    assert torch.equal(log_det[:8], torch.zeros(8, dtype=torch.float64))  # every moved entry in the tails
    assert (log_det[8:] != 0).any()
    x_back, log_det_back = layer.inverse_and_log_det(y)
    assert torch.equal(x_back[tails], x[tails])
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-9)
    torch.testing.assert_close(log_det_back, log_det, rtol=0, atol=1e-9)


@pytest.mark.parametrize("parallel", ["inverse", "forward"])
def test_autoregressive_tails_are_the_identity(parallel: str) -> None:
    layer = _perturbed(SplineAutoregressive(MADE(3, [16], num_params=14), parallel, bins=5, bound=1.0))  # type: ignore[arg-type]
    _tails_check(layer, torch.ones(3, dtype=torch.bool), 1.0)


def test_coupling_tails_are_the_identity() -> None:
    kept = coupling_mask(4, 1)
    layer = _perturbed(SplineCoupling(MLP(2, [16], 23 * 2), kept, bound=0.5))
    _tails_check(layer, ~kept, 0.5)


def test_the_skeletons_hand_the_spline_a_view_of_the_network_output() -> None:
    layer = nsf(5, [16], 1, bins=4).parts[0]
    raw = torch.randn(7, 11 * 5)
    params = layer._layout(raw)
    assert params.shape == (11, 7, 5) and params.data_ptr() == raw.data_ptr()  # no copy
    assert all(torch.equal(p, c) for p, c in zip(params, raw.chunk(11, dim=-1)))  # the MADE's layout, read as is
    split = nsf(5, [16], 1, coupling=True).parts[0].split
    raw = torch.randn(7, 23 * 3)
    assert split.params(raw, 23).data_ptr() == raw.data_ptr()


@pytest.mark.parametrize("parallel", ["inverse", "forward"])
def test_incremental_and_reference_solves_agree(parallel: str) -> None:
    """The sequential direction (MAF sampling, IAF density of data): values and gradients of both solves."""
    methods = ("incremental", "reference")
    flows = [nsf(6, [24, 24], 2, bins=4, parallel=parallel, sequential=method) for method in methods]
    _perturbed(flows[0])
    flows[1].double().load_state_dict(flows[0].state_dict())
    given = torch.randn(9, 6, dtype=torch.float64) * 2
    results = []
    for flow in flows:
        given_ = given.clone().requires_grad_()
        out, log_det = flow.forward_and_log_det(given_) if parallel == "inverse" else flow.inverse_and_log_det(given_)
        grads = torch.autograd.grad(out.square().sum() + log_det.sum(), [given_, *flow.parameters()])
        results.append((out.detach(), log_det.detach(), *grads))
    assert (results[0][0] - given).abs().max() > 0.1  # a map far from the identity
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


# -- entry points ----------------------------------------------------------------------------------------------


def test_registry_builds_both_forms() -> None:
    assert {"nsf", "nsf-coupling"} <= set(FLOWS) and FLOWS["nsf"].kind == FLOWS["nsf-coupling"].kind == "vector"
    flow = FLOWS["nsf"].build(3, hidden_dims=[8], num_transforms=2, bins=4)
    assert flow.parallel == "inverse" and flow.parts[0].elementwise.bins == 4
    assert FLOWS["nsf-coupling"].build(3, hidden_dims=[8], num_transforms=2).parallel == "both"
    conditional = flow_factory("nsf-coupling", conditional=True)(3, 5, hidden_dims=[8], num_transforms=2)
    t = conditional.condition(torch.randn(4, 5))
    assert t.parallel == "both" and t(torch.randn(4, 3)).shape == (4, 3)


def test_autoflow_with_a_spline_guide_in_the_iaf_direction_scores_its_samples_in_one_pass() -> None:
    model = banana_model()
    guide = AutoFlow(model, "nsf", hidden_dims=[16], num_transforms=2, parallel="forward")
    losses = run_svi(model, guide, 60)
    assert sum(losses[-10:]) < sum(losses[:10])
    counter = CallCounter(guide.flow)
    q = guide.get_posterior()
    q.log_prob(q.rsample((5,)))
    assert counter.counts == [1, 1]
    counter.close()


def test_amortized_spline_posterior_in_the_iaf_direction() -> None:
    posterior = AmortizedFlowPosterior("nsf", 3, 4, [16], 2, parallel="forward")
    assert posterior.flow is not None
    counter = CallCounter(posterior.flow)
    q = posterior(torch.zeros(5, 3), torch.ones(5, 3), torch.randn(5, 4))
    z = q.rsample()
    assert q.log_prob(z).shape == (5,) and counter.counts == [1, 1]
    counter.close()


def test_spline_prior_trains_jointly() -> None:
    """A spline prior inside a model, trained with the guide by SVI, explains the data better than its base."""
    torch.manual_seed(1)
    n = 32
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    x = centres[torch.arange(n) % 2] + 0.3 * torch.randn(n, 2, dtype=torch.float64)
    prior_flow = nsf(2, hidden_dims=[8], num_transforms=2).double()
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)

    def model(x: Tensor) -> None:
        pyro.module("prior_flow", prior_flow)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.TransformedDistribution(base, [prior_flow]))
            pyro.sample("x", dist.Normal(z, 0.1).to_event(1), obs=x)

    svi = SVI(model, AutoNormal(model, init_scale=0.05), Adam({"lr": 0.02}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(300)]
    assert sum(losses[-20:]) < 0.1 * sum(losses[:20])
    names = [n for n in pyro.get_param_store().keys() if n.startswith("prior_flow$$$")]
    assert len(names) == len(list(prior_flow.parameters())) > 0
    with torch.no_grad():
        learnt = dist.TransformedDistribution(base, [prior_flow]).log_prob(x).mean()
    assert learnt > base.log_prob(x).mean() + 0.3


# -- images ------------------------------------------------------------------------------------------------------


def test_image_spline_coupling_layout_and_tails() -> None:
    layer = image_coupling((4, 2, 2), 8, coupling="spline", bins=3, bound=0.5)
    assert layer.elementwise == RationalQuadraticSpline(3, 0.5, inverted=True) and layer.coupling == "spline"
    assert layer.net(torch.zeros(1, 2, 2, 2)).shape == (1, 8 * 2, 2, 2)  # 3K - 1 = 8 parameters per moved channel
    _perturbed(layer)
    x = torch.randn(16, 4, 2, 2, dtype=torch.float64) * 2
    y, log_det = layer.forward_and_log_det(x)
    tails = x[:, 2:].abs() > 0.5
    assert torch.equal(y[:, 2:][tails], x[:, 2:][tails]) and torch.equal(y[:, :2], x[:, :2])
    x_back, log_det_back = layer.inverse_and_log_det(y)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-9)
    torch.testing.assert_close(log_det_back, log_det, rtol=0, atol=1e-9)


def test_image_flows_pass_the_spline_options_through() -> None:
    flow = glow((1, 4, 4), levels=2, depth=1, hidden_channels=8, coupling="spline", bins=5, bound=2.0)
    splines = [m.elementwise for m in flow.modules() if getattr(m, "coupling", "") == "spline"]
    assert len(splines) == 2 and set(splines) == {RationalQuadraticSpline(5, 2.0, inverted=True)}
    flow = realnvp_multiscale((1, 4, 4), levels=1, hidden_channels=8, num_blocks=1, coupling="spline", bins=3)
    splines = [
        m.elementwise for m in flow.modules() if isinstance(m, Coupling) and getattr(m, "coupling", "") == "spline"
    ]
    assert len(splines) == 10 and set(splines) == {RationalQuadraticSpline(3, inverted=True)}
    with pytest.raises(ValueError, match="bound apply to coupling='spline', got coupling='additive'"):
        realnvp_multiscale((1, 4, 4), levels=1, coupling="additive", bound=2.0)
