"""pyro_nf under the TorchScript tracer: flow guides in Pyro's JIT ELBOs, traced guides saved and loaded."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, JitTrace_ELBO, JitTraceMeanField_ELBO, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.nn import PyroModule, PyroSample
from pyro.optim import Adam
from torch import nn

from pyro_nf.infer import AutoFlow
from pyro_nf.nn.made import MADE
from pyro_nf.nn.nets import MLP
from pyro_nf.transforms import iaf, maf

VECTOR_FLOWS = ["iaf", "maf", "realnvp"]

# torch 2.x deprecates the TorchScript tracer (in favour of torch.compile / torch.export); Pyro's JIT ELBOs
# and its serialization tests still use it, so pyro_nf must keep working under it.
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:.*torch\.jit.* deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]


def banana() -> None:
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("obs", 3):
        pyro.sample("y", dist.Normal(a + b**2, 0.3), obs=torch.tensor([1.2, 0.9, 1.1]))


def losses(guide: Callable[..., object], elbo: pyro.infer.ELBO, steps: int) -> list[float]:
    svi = SVI(banana, guide, Adam({"lr": 0.01}), elbo)
    return [svi.step() for _ in range(steps)]


def loss_and_grads(guide: AutoFlow, elbo: pyro.infer.ELBO, seed: int) -> tuple[float, list[torch.Tensor]]:
    for p in guide.parameters():
        p.grad = None
    pyro.set_rng_seed(seed)
    loss = elbo.loss_and_grads(banana, guide)
    return loss, [p.grad.clone() for p in guide.parameters()]


@pytest.mark.parametrize("flow", VECTOR_FLOWS)
def test_autoflow_runs_under_jit_trace_elbo(flow: str) -> None:
    guide = AutoFlow(banana, flow, hidden_dims=[8], num_transforms=2)
    # Six steps first: TorchScript's profiling executor rewrites the graph after the first runs, which is
    # where the in-place ReLU and the MADE's partly used outputs failed.
    assert all(math.isfinite(v) for v in losses(guide, JitTrace_ELBO(ignore_jit_warnings=True), 6))
    traced = JitTrace_ELBO(ignore_jit_warnings=True)
    loss_and_grads(guide, traced, 0)  # compiles this ELBO's graph
    loss_and_grads(guide, traced, 0)
    # the same draws and parameters: the traced loss and gradients are the eager ones
    traced_loss, traced_grads = loss_and_grads(guide, traced, 7)
    eager_loss, eager_grads = loss_and_grads(guide, Trace_ELBO(), 7)
    assert traced_loss == pytest.approx(eager_loss, rel=1e-5)
    for t, e in zip(traced_grads, eager_grads):
        assert torch.allclose(t, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flow", VECTOR_FLOWS)
def test_autoflow_runs_under_jit_trace_mean_field_elbo(flow: str) -> None:
    guide = AutoFlow(banana, flow, hidden_dims=[8], num_transforms=2)
    assert all(math.isfinite(v) for v in losses(guide, JitTraceMeanField_ELBO(ignore_jit_warnings=True), 6))
    # Pyro 1.9's JitTraceMeanField_ELBO traces afresh at every call (it looks the compiled loss up under
    # another name), so its draws differ from an eager run's: compare the estimates, not the draws.
    particles = dict(num_particles=500, vectorize_particles=True)
    eager = torch.tensor([TraceMeanField_ELBO(**particles).loss(banana, guide) for _ in range(8)])
    traced = JitTraceMeanField_ELBO(ignore_jit_warnings=True, **particles).loss_and_grads(banana, guide)
    assert abs(traced - eager.mean().item()) < 4 * eager.std().item() * math.sqrt(1 + 1 / len(eager))


def test_autoflow_ffjord_refuses_the_tracer_with_the_reason() -> None:
    guide = AutoFlow(banana, "ffjord", hidden_dims=[8])
    with pytest.raises(RuntimeError, match="cannot be traced.*Trace_ELBO"):
        losses(guide, JitTrace_ELBO(ignore_jit_warnings=True), 1)


def test_relu_networks_trace_with_the_eager_gradients() -> None:
    # activate() applies the ReLU in place eagerly, out of place under the tracer
    for net in (MLP(3, [8, 8], 4, zero_init_output=False), MADE(3, [8, 8], 2, zero_init_output=False)):
        x = torch.randn(3)  # one unbatched vector, as AutoContinuous packs its latents
        params = tuple(net.parameters())

        def loss(*_: torch.Tensor) -> torch.Tensor:
            return net(x).pow(2).sum()  # noqa: B023

        traced = torch.jit.trace(loss, params, check_trace=False)
        for _ in range(4):  # past the profiling runs
            traced_grads = torch.autograd.grad(traced(*params), params)
        eager_grads = torch.autograd.grad(loss(), params)
        for t, e in zip(traced_grads, eager_grads):
            assert torch.allclose(t, e, atol=1e-6)


class _Sequential(nn.Module):
    """A module whose ``forward`` runs a flow's sequential direction: MAF sampling or IAF density."""

    def __init__(self, factory: Callable[..., nn.Module], inverse: bool) -> None:
        super().__init__()
        self.flow = factory(3, hidden_dims=[8], num_transforms=2)
        self.inverse = inverse
        for p in self.flow.parameters():
            nn.init.normal_(p, std=0.3)  # away from the identity, so the solve matters

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flow.inverse_and_log_det(x) if self.inverse else self.flow.forward_and_log_det(x)


@pytest.mark.parametrize("factory, inverse", [(maf, False), (iaf, True)], ids=["maf-sampling", "iaf-density"])
def test_a_traced_sequential_direction_saves_and_loads(factory: Callable[..., nn.Module], inverse: bool) -> None:
    module = _Sequential(factory, inverse)
    noise = torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(module, (noise,), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)  # the incremental pass's autograd function could not be saved
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    other = torch.randn(6, 3)
    for got, want in zip(loaded(other), module(other)):
        assert torch.allclose(got, want, atol=1e-5)


# -- Pyro's two serialization tests of its autoguide suite (tests/infer/test_autoguide.py), with AutoFlow ----------


def serialization_model() -> None:
    pyro.sample("x", dist.Normal(0.0, 1.0))
    with pyro.plate("plate", 2):
        pyro.sample("y", dist.LogNormal(0.0, 1.0))
        pyro.sample("z", dist.Beta(2.0, 2.0))


@pytest.mark.parametrize("flow", VECTOR_FLOWS)
def test_serialization_of_a_traced_autoflow(flow: str) -> None:
    guide = AutoFlow(serialization_model, flow, hidden_dims=[8], num_transforms=2)
    guide()
    pyro.set_rng_seed(0)
    expected = guide.call()
    latent_names = sorted(guide())
    expected_params = {k: v.data for k, v in guide.named_parameters()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced_guide = torch.jit.trace_module(guide, {"call": ()}, check_trace=False)
    f = io.BytesIO()
    torch.jit.save(traced_guide, f)
    del guide, traced_guide
    pyro.clear_param_store()
    f.seek(0)
    guide_deser = torch.jit.load(f)

    pyro.set_rng_seed(0)
    actual = guide_deser.call()
    assert len(actual) == len(expected) == len(latent_names)
    for name, a, e in zip(latent_names, actual, expected):
        assert torch.allclose(a, e), name
    actual_params = {k: v.data for k, v in guide_deser.named_parameters()}
    assert set(actual_params) == set(expected_params)
    for name, value in expected_params.items():
        assert torch.equal(actual_params[name], value), name


def test_predictive_with_an_autoflow_traces_and_saves() -> None:
    N, D = 3, 2

    class RandomLinear(nn.Linear, PyroModule):
        def __init__(self, in_features: int, out_features: int) -> None:
            super().__init__(in_features, out_features)
            self.weight = PyroSample(dist.Normal(0.0, 1.0).expand([out_features, in_features]).to_event(2))
            self.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

    class LinearRegression(PyroModule):
        def __init__(self) -> None:
            super().__init__()
            self.linear = RandomLinear(D, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            mean = self.linear(x).squeeze(-1)
            sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
            with pyro.plate("plate", N):
                return pyro.sample("obs", dist.Normal(mean, sigma), obs=y)

    x, y = torch.randn(N, D), torch.randn(N)
    model = LinearRegression()
    guide = AutoFlow(model, "iaf", hidden_dims=[8], num_transforms=2)
    guide(x, y=y)
    predictive = Predictive(model, guide=guide, num_samples=10)
    pyro.set_rng_seed(0)
    samples = predictive(x)
    assert {"linear.weight", "linear.bias", "sigma", "obs"} <= set(samples)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced_predictive = torch.jit.trace_module(predictive, {"call": (x,)})
    f = io.BytesIO()
    torch.jit.save(traced_predictive, f)
    f.seek(0)
    predictive_deser = torch.jit.load(f)
    pyro.set_rng_seed(0)
    samples_deser = predictive_deser.call(x)
    assert len(samples) == len(samples_deser)
    for value, name in zip(samples_deser, sorted(samples)):
        assert value.shape == samples[name].shape and torch.isfinite(value).all(), name


def test_the_jit_benchmark_smoke_run() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "jit_elbo", Path(__file__).resolve().parent.parent / "benchmarks" / "jit_elbo.py"
    )
    assert spec is not None and spec.loader is not None
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    rows = benchmark.main(["--smoke-test", "--flows", "iaf"])
    assert [(flow, elbo) for flow, elbo, _, _ in rows] == [("iaf", "Trace_ELBO"), ("iaf", "TraceMeanField_ELBO")]
    assert all(eager > 0 and jit > 0 for _, _, eager, jit in rows)
