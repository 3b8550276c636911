"""Flows inside Pyro inference: flow guides, flow priors, amortized posteriors, the IWAE estimate."""

from __future__ import annotations

import importlib.util
import math
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, AutoNormalizingFlow
from pyro.optim import Adam
from torch import Tensor

from pyro_nf.infer import AmortizedFlowPosterior, AutoFlow, amortized_flow, amortized_posterior, iwae_log_likelihood
from pyro_nf.transforms import iaf, maf, realnvp
from tests.contract import CallCounter, Case, instantiate

HAS_FFJORD = any(
    importlib.util.find_spec(name) is not None
    for name in ("pyro_nf.transforms.ffjord", "pyro_nf.transforms.continuous")
)


def banana_model(dtype: torch.dtype = torch.float32) -> callable:  # type: ignore[valid-type]
    y = torch.tensor([1.2, 0.9, 1.4, 1.1], dtype=dtype)

    def model() -> None:
        a = pyro.sample("a", dist.Normal(torch.zeros((), dtype=dtype), 1.0))
        b = pyro.sample("b", dist.Normal(torch.zeros((), dtype=dtype), 1.0))
        with pyro.plate("obs", len(y)):
            pyro.sample("y", dist.Normal(a + b**2, 0.3), obs=y)

    return model


def run_svi(model, guide, steps: int, lr: float = 0.02) -> list[float]:  # type: ignore[no-untyped-def]
    svi = SVI(model, guide, Adam({"lr": lr}), Trace_ELBO(num_particles=4, vectorize_particles=True))
    return [svi.step() for _ in range(steps)]


def assert_decreases(losses: list[float]) -> None:
    head, tail = losses[:20], losses[-20:]
    assert all(math.isfinite(v) for v in losses)
    assert sum(tail) / len(tail) < sum(head) / len(head) - 1.0, (sum(head) / 20, sum(tail) / 20)


# -- flow guides -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flow", ["iaf", "maf", "realnvp", "nsf", "nsf-coupling"])
def test_autoflow_trains_and_registers_parameters(flow: str) -> None:
    model = banana_model()
    guide = AutoFlow(model, flow, hidden_dims=[16], num_transforms=2)
    assert_decreases(run_svi(model, guide, 150))
    store = pyro.get_param_store()
    flow_params = {name: p for name, p in store.named_parameters() if name.startswith("AutoFlow.flow$$$")}
    assert len(flow_params) == len(list(guide.flow.parameters())) > 0
    assert {"AutoFlow.loc", "AutoFlow.scale"} <= set(store.keys())
    # the store holds the very tensors the flow trains
    assert {id(p) for p in flow_params.values()} == {id(p) for p in guide.flow.parameters()}
    assert guide.get_posterior().rsample((3,)).shape == (3, 2)


def test_autoflow_follows_the_models_dtype() -> None:
    model = banana_model(torch.float64)
    guide = AutoFlow(model, hidden_dims=[8], num_transforms=2)
    run_svi(model, guide, 2)
    assert all(p.dtype == torch.float64 for p in guide.parameters())
    assert all(v.dtype == torch.float64 for v in pyro.get_param_store().values())
    sample = guide()
    assert sample["a"].dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autoflow_follows_the_models_device() -> None:
    y = torch.tensor([1.0, 0.5], device="cuda")

    def model() -> None:
        a = pyro.sample("a", dist.Normal(torch.zeros(2, device="cuda"), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(a, 0.5).to_event(1), obs=y)

    guide = AutoFlow(model, hidden_dims=[8], num_transforms=2)
    run_svi(model, guide, 2)
    assert all(p.device.type == "cuda" for p in guide.parameters())


def test_autoflow_iaf_scores_its_samples_in_one_pass() -> None:
    model = banana_model()
    guide = AutoFlow(model, "iaf", hidden_dims=[8], num_transforms=3)
    guide()  # builds the prototype
    counter = CallCounter(guide.flow)
    assert len(counter.nets) == 3
    q = guide.get_posterior()
    z = q.rsample((5,))
    q.log_prob(z)
    assert counter.counts == [1, 1, 1]
    counter.close()
    # and the log-density is that of the affine-transformed flow
    y, log_det = guide.flow.forward_and_log_det(eps := torch.randn(4, 2))
    z = guide.loc + guide.scale * y
    expected = dist.Normal(0.0, 1.0).log_prob(eps).sum(-1) - log_det - guide.scale.log().sum()
    assert torch.allclose(q.log_prob(z.detach().clone()), expected, atol=1e-4)


def test_autoflow_bad_arguments() -> None:
    with pytest.raises(ValueError, match="flow: expected one of"):
        AutoFlow(banana_model(), "glow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hidden_dims"):
        AutoFlow(banana_model(), hidden_dims=[])
    with pytest.raises(ValueError, match="init_scale"):
        AutoFlow(banana_model(), init_scale=0.0)


def test_autoflow_ffjord() -> None:
    if not HAS_FFJORD:
        with pytest.raises(ImportError, match="FFJORD"):
            AutoFlow(banana_model(), "ffjord")
        return
    model = banana_model()
    guide = AutoFlow(model, "ffjord", hidden_dims=[16])
    losses = run_svi(model, guide, 3)
    assert all(math.isfinite(v) for v in losses)


def median_model() -> None:
    """The model of Pyro's autoguide ``test_median``: a Normal, a LogNormal and a Beta site."""
    pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.LogNormal(0.0, 1.0))
    pyro.sample("z", dist.Beta(2.0, 2.0))


def wide_model() -> None:
    """Wide sites behind an exponential: what overflowed when the guide's scale overshot."""
    pyro.sample("x", dist.Normal(0.0, 5.0))
    pyro.sample("y", dist.LogNormal(0.0, 3.0))


def train_median_model(lr: float, seed: int, particles: int) -> tuple[AutoFlow, list[float]]:
    """Pyro's test_median set-up: Adam(lr, betas=(0.8, 0.99)), vectorized particles, 100 steps."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoFlow(median_model)
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True)
    svi = SVI(median_model, guide, Adam({"lr": lr, "betas": (0.8, 0.99)}), elbo)
    return guide, [svi.step() for _ in range(100)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_autoflow_defaults_pass_pyros_test_median(seed: int) -> None:
    # Pyro's test_median since 1.8: lr 0.02, 500 particles; its tolerances (prec=0.1), on medians of
    # draws (AutoFlow has no closed-form median)
    guide, losses = train_median_model(0.02, seed, 500)
    assert all(math.isfinite(v) for v in losses)
    with torch.no_grad():
        draws = Predictive(median_model, guide=guide, num_samples=4000, parallel=True)()
    assert abs(draws["x"].median().item()) < 0.1
    assert abs(draws["y"].median().item() - 1.0) < 0.1
    assert abs(draws["z"].median().item() - 0.5) < 0.1


def test_autoflow_defaults_stay_finite_at_pyros_old_test_median_rate() -> None:
    # At lr 0.05 with 100 particles (Pyro's older test_median) the defaults once diverged within 2 steps in
    # 3 of 3 seeds: init_scale 0.1 and the factories' per-layer bound of 3 nats let the first Adam
    # steps widen every layer at once, to exp(15) times the right width. The posterior is the prior
    # here, so -ELBO is the KL divergence to it: near 0 at the end.
    for seed in range(3):
        _, losses = train_median_model(0.05, seed, 100)
        assert all(math.isfinite(v) for v in losses), seed
        assert sum(losses[-20:]) / 20 < 0.1, (seed, losses[-20:])


@pytest.mark.parametrize("lr", [0.05, 0.005])
def test_autoflow_defaults_stay_finite_on_wide_sites(lr: float) -> None:
    for seed in range(3):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = AutoFlow(wide_model)
        svi = SVI(
            wide_model,
            guide,
            Adam({"lr": lr, "betas": (0.8, 0.99)}),
            Trace_ELBO(num_particles=50, vectorize_particles=True),
        )
        losses = [svi.step() for _ in range(60)]
        assert all(math.isfinite(v) for v in losses), (seed, losses)


def test_autoflow_bounds_the_affine_layers_it_builds() -> None:
    guide = AutoFlow(banana_model(), "realnvp", hidden_dims=[8], num_transforms=2)
    guide()
    assert {part.elementwise.log_scale_bound for part in guide.flow.parts} == {1.0}
    guide = AutoFlow(banana_model(), "iaf", hidden_dims=[8], num_transforms=2, log_scale_bound=2.5)
    guide()
    assert {part.elementwise.log_scale_bound for part in guide.flow.parts} == {2.5}
    assert torch.allclose(guide.scale, torch.ones(2))


def test_autoflow_takes_a_factory_function_and_follows_the_models_dtype() -> None:
    model = banana_model(torch.float64)
    guide = AutoFlow(model, partial(iaf, hidden_dims=[8], num_transforms=2))
    assert guide.flow_name == "iaf"
    run_svi(model, guide, 2)
    assert all(p.dtype == torch.float64 for p in guide.parameters())
    # Pyro's AutoNormalizingFlow builds the same factory at torch's default dtype (the docs say so)
    pyro.clear_param_store()
    other = AutoNormalizingFlow(model, partial(iaf, hidden_dims=[8], num_transforms=2))
    run_svi(model, other, 1)
    assert all(p.dtype == torch.float32 for p in other.transform.parameters())
    with pytest.raises(TypeError, match="flow: expected a flow name or a function"):
        AutoFlow(model, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize("factory", [iaf, maf, realnvp], ids=lambda f: f.__name__)
def test_factories_plug_into_pyros_autonormalizingflow(factory) -> None:  # type: ignore[no-untyped-def]
    model = banana_model()
    guide = AutoNormalizingFlow(model, partial(factory, hidden_dims=[16], num_transforms=2))
    assert_decreases(run_svi(model, guide, 150, lr=0.03))
    names = [n for n in pyro.get_param_store().keys() if n.startswith("AutoNormalizingFlow.transform$$$")]
    assert len(names) == len(list(guide.transform.parameters())) > 0


# -- flow priors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [maf, realnvp], ids=lambda f: f.__name__)
def test_flow_prior_trains_jointly(factory) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    n = 32
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    x = centres[torch.arange(n) % 2] + 0.3 * torch.randn(n, 2, dtype=torch.float64)
    prior_flow = factory(2, hidden_dims=[8], num_transforms=2).double()

    def model(x: Tensor) -> None:
        pyro.module("prior_flow", prior_flow)
        base = dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.TransformedDistribution(base, [prior_flow]))
            pyro.sample("x", dist.Normal(z, 0.1).to_event(1), obs=x)

    guide = AutoNormal(model, init_scale=0.05)
    before = [p.detach().clone() for p in prior_flow.parameters()]
    svi = SVI(model, guide, Adam({"lr": 0.02}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(60)]
    assert_decreases(losses)
    assert all(not torch.equal(a, b) for a, b in zip(before, prior_flow.parameters()))
    store = pyro.get_param_store()
    names = [n for n in store.keys() if n.startswith("prior_flow$$$")]
    assert len(names) == len(before)
    assert all(store[n].dtype == torch.float64 for n in names)
    # the learnt prior explains the data better than the standard Normal it started as
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    learnt = dist.TransformedDistribution(base, [prior_flow])
    with torch.no_grad():
        assert learnt.log_prob(x).mean() > base.log_prob(x).mean() + 0.3


# -- amortized posteriors ------------------------------------------------------------------------------------------

CONTEXT = 4
AMORTIZED = ["iaf", "maf", "realnvp", "nsf", "nsf-coupling", "planar", "sylvester"] + (["ffjord"] if HAS_FFJORD else [])


def amortized_case(kind: str) -> Case:
    hidden = None if kind == "sylvester" else [8] if kind == "ffjord" else [16]
    options = {"rtol": 1e-9, "atol": 1e-9} if kind == "ffjord" else {}
    layers = 1 if kind == "ffjord" else 2
    return Case(
        f"amortized-{kind}",
        lambda s: amortized_flow(kind, s[0], CONTEXT, hidden, num_transforms=layers, **options),  # type: ignore[arg-type]
        shape=(3,),
        context_dim=CONTEXT,
    )


def forward_and_log_det(t, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
    """Through Pyro's interface, so that Pyro's own transforms are checked the same way."""
    y = t(x)
    return y, t.log_abs_det_jacobian(x, y)


@pytest.mark.parametrize("kind", AMORTIZED)
def test_amortized_flow_after_condition(kind: str) -> None:
    case = amortized_case(kind)
    inst = instantiate(case, batch=(3,), std=0.3)
    t, context = inst.transform, inst.context
    assert context is not None
    x = torch.randn(3, *case.shape, dtype=torch.float64)
    y, log_det = forward_and_log_det(t, x)
    assert y.shape == x.shape and log_det.shape == (3,)
    assert not torch.allclose(y, x)
    if kind not in ("planar", "sylvester"):  # Pyro's planar and Sylvester flows have no inverse
        x_back = t.inv(y.clone())
        assert (x_back - x).abs().max() <= 1e-6
    for i in range(3):
        ti = inst.owner.condition(context[i])  # type: ignore[operator]
        jac = torch.autograd.functional.jacobian(lambda v, ti=ti: ti(v), x[i].clone())
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0
        assert abs(logabsdet - log_det[i]) <= 1e-5, (kind, logabsdet.item(), log_det[i].item())
    # the context matters: another context gives another map
    y_other = inst.owner.condition(torch.randn_like(context))(x.clone())  # type: ignore[operator]
    assert (y_other - y).abs().max() > 1e-3 or kind == "sylvester"


@pytest.mark.parametrize("kind", ["gaussian", *AMORTIZED])
def test_amortized_posterior_density(kind: str) -> None:
    hidden = None if kind in ("gaussian", "sylvester") else [16]
    layers = 1 if kind == "ffjord" else 2
    posterior = AmortizedFlowPosterior(kind, 3, CONTEXT, hidden, layers).double()  # type: ignore[arg-type]
    loc = torch.randn(5, 3, dtype=torch.float64)
    scale = torch.rand(5, 3, dtype=torch.float64) + 0.5
    context = torch.randn(5, CONTEXT, dtype=torch.float64)
    q = posterior(loc, scale, context)
    assert q.batch_shape == (5,) and q.event_shape == (3,)
    z = q.rsample((7,))
    assert z.shape == (7, 5, 3)
    log_q = q.log_prob(z)
    assert log_q.shape == (7, 5) and torch.isfinite(log_q).all()
    # the density of the posterior's own draws is the change of variables from the base noise
    z0 = dist.Normal(loc, scale).rsample((7,))
    if posterior.flow is None:
        z, log_det = z0, torch.zeros(7, 5, dtype=torch.float64)
    else:
        z, log_det = forward_and_log_det(posterior.flow.condition(context), z0)
    expected = dist.Normal(loc, scale).to_event(1).log_prob(z0) - log_det
    if posterior.flow is not None:  # score the same draw through the distribution's transform
        q = posterior(loc, scale, context)
        transform = q.transforms[0]
        z = transform(z0)
    assert torch.allclose(q.log_prob(z), expected, atol=1e-6)


def test_amortized_posterior_bad_input() -> None:
    flow = amortized_flow("iaf", 2, CONTEXT, [8], 1)
    with pytest.raises(ValueError, match="context: expected"):
        amortized_posterior(torch.zeros(3, 2), torch.ones(3, 2), flow)
    with pytest.raises(ValueError, match="batch shape"):
        amortized_posterior(torch.zeros(3, 2), torch.ones(3, 2), flow, torch.zeros(4, CONTEXT))
    with pytest.raises(ValueError, match="one shape"):
        amortized_posterior(torch.zeros(3, 2), torch.ones(3, 3), flow, torch.zeros(3, CONTEXT))
    with pytest.raises(ValueError, match="kind: expected one of"):
        amortized_flow("glow", 2, CONTEXT)  # type: ignore[arg-type]


class TinyVAE(torch.nn.Module):
    """A small VAE with an amortized flow posterior and a flow prior, for the SVI and IWAE tests."""

    def __init__(self, kind: str, data_dim: int = 6, latent: int = 2, prior: bool = True) -> None:
        super().__init__()
        self.latent = latent
        self.encoder = torch.nn.Sequential(torch.nn.Linear(data_dim, 16), torch.nn.Tanh())
        self.loc_scale = torch.nn.Linear(16, 2 * latent)
        self.decoder = torch.nn.Sequential(torch.nn.Linear(latent, 16), torch.nn.Tanh(), torch.nn.Linear(16, data_dim))
        self.posterior = AmortizedFlowPosterior(kind, latent, 16, [16], 2)  # type: ignore[arg-type]
        self.prior_flow = maf(latent, [16], 2) if prior else None

    def model(self, x: Tensor, batch_size: int | None = None) -> None:
        pyro.module("decoder", self.decoder)
        base = dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1)
        prior = base
        if self.prior_flow is not None:
            pyro.module("prior_flow", self.prior_flow)
            prior = dist.TransformedDistribution(base, [self.prior_flow])
        with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x[idx])

    def guide(self, x: Tensor, batch_size: int | None = None) -> None:
        pyro.module("encoder", self.encoder)
        pyro.module("loc_scale", self.loc_scale)
        pyro.module("posterior", self.posterior)
        with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
            h = self.encoder(x[idx])
            loc, raw = self.loc_scale(h).chunk(2, -1)
            pyro.sample("z", self.posterior(loc, torch.nn.functional.softplus(raw) + 1e-3, h))


@pytest.mark.parametrize("kind", ["iaf", "planar", "nsf"])
def test_vae_with_flow_posterior_and_flow_prior(kind: str) -> None:
    x = (torch.rand(40, 6) < torch.linspace(0.1, 0.9, 6)).float()
    vae = TinyVAE(kind)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step(x, 10) for _ in range(120)]
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 0.5
    names = set(pyro.get_param_store().keys())
    for prefix in ("decoder$$$", "encoder$$$", "posterior$$$", "prior_flow$$$"):
        assert any(n.startswith(prefix) for n in names), prefix
    est = iwae_log_likelihood(vae.model, vae.guide, x, num_samples=64, chunk_size=16)
    assert est.per_datum.shape == (40,) and torch.isfinite(est.per_datum).all()
    elbo = iwae_log_likelihood(vae.model, vae.guide, x, num_samples=1).per_datum
    assert est.mean > elbo.mean()  # the K=64 bound is tighter than a one-sample ELBO (by far more than noise)


# -- IWAE on a linear-Gaussian model ----------------------------------------------------------------------------


class LinearGaussian:
    """``z ~ N(0, I_2)``, ``x = W z + b + N(0, s^2 I_3)``: ``p(x) = N(b, W W^T + s^2 I)`` in closed form."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.W = torch.randn(3, 2, generator=g, dtype=torch.float64)
        self.b = torch.randn(3, generator=g, dtype=torch.float64)
        self.s = 0.5
        cov = self.W @ self.W.T + self.s**2 * torch.eye(3, dtype=torch.float64)
        self.marginal = dist.MultivariateNormal(self.b, cov)
        # exact posterior: precision P = I + W^T W / s^2, mean P^{-1} W^T (x - b) / s^2
        self.post_cov = torch.linalg.inv(torch.eye(2, dtype=torch.float64) + self.W.T @ self.W / self.s**2)
        self.x = self.marginal.sample((50,))

    def model(self, x: Tensor) -> None:
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.s).to_event(1), obs=x)

    def guide(self, x: Tensor, inflate: float = 1.0, shift: float = 0.0) -> None:
        mean = (x - self.b) @ self.W @ self.post_cov.T / self.s**2 + shift
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.MultivariateNormal(mean, inflate**2 * self.post_cov))


def test_iwae_is_exact_with_the_exact_posterior() -> None:
    lg = LinearGaussian()
    exact = lg.marginal.log_prob(lg.x)
    for k, chunk in ((1, 1), (7, 3)):
        est = iwae_log_likelihood(lg.model, lg.guide, lg.x, num_samples=k, chunk_size=chunk)
        assert est.per_datum.shape == (50,) and est.per_datum.dtype == torch.float64
        assert (est.per_datum - exact).abs().max() < 1e-9  # the weights are constant: no Monte Carlo error
        assert abs(est.mean - exact.mean().item()) < 1e-9


def test_iwae_tightens_as_k_grows() -> None:
    lg = LinearGaussian()
    exact = lg.marginal.log_prob(lg.x)

    def gap(k: int) -> Tensor:
        guide = partial(lg.guide, inflate=1.6, shift=0.4)
        est = iwae_log_likelihood(lg.model, guide, lg.x, num_samples=k, chunk_size=500)
        return exact - est.per_datum

    gaps = {k: gap(k) for k in (1, 10, 2000)}
    means = {k: g.mean().item() for k, g in gaps.items()}
    # K=1 is the ELBO: its mean gap is the mean KL(q || p(z|x)) (about 0.8 nats here) up to noise
    assert means[1] > 0.4
    assert means[1] > means[10] + 0.2 > means[2000] + 0.2
    assert abs(means[2000]) < 0.03  # 50 points x 2000 samples: the bound meets log p(x)
    assert gaps[2000].abs().max() < 0.15


def test_iwae_with_a_global_latent_gives_one_number() -> None:
    x = torch.tensor([0.3, -0.4, 1.1], dtype=torch.float64)
    n = len(x)

    def model(x: Tensor) -> None:
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
        with pyro.plate("data", n):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x: Tensor) -> None:  # the exact posterior N(sum x / (n + 1), 1 / (n + 1))
        pyro.sample("z", dist.Normal(x.sum() / (n + 1), (1.0 / (n + 1)) ** 0.5))

    exact = dist.MultivariateNormal(
        torch.zeros(n, dtype=torch.float64), torch.eye(n, dtype=torch.float64) + 1.0
    ).log_prob(x)
    est = iwae_log_likelihood(model, guide, x, num_samples=5, chunk_size=2)
    assert est.per_datum.shape == ()
    assert abs(est.mean - exact.item()) < 1e-9
    with pytest.raises(ValueError, match="data_plate"):
        iwae_log_likelihood(model, guide, x, num_samples=2, data_plate="data")


def test_iwae_bad_arguments() -> None:
    lg = LinearGaussian()
    with pytest.raises(ValueError, match="num_samples"):
        iwae_log_likelihood(lg.model, lg.guide, lg.x, num_samples=0)
    with pytest.raises(ValueError, match="chunk_size"):
        iwae_log_likelihood(lg.model, lg.guide, lg.x, chunk_size=-1)
