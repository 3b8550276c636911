"""Flow matching for FFJORD: the objective's minimiser, OT pairing, the multiscale path, training, errors."""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable

import pyro.distributions as dist
import pytest
import torch
from torch import Tensor

from pyro_nf.data.toy import sample_toy
from pyro_nf.nn.odefunc import ConvODENet, ODENet
from pyro_nf.transforms import (
    FFJORD,
    ActNorm,
    FactorOut,
    FlowStack,
    InverseTransformModule,
    ODEOptions,
    Squeeze,
    block_segments,
    conditional_ffjord,
    ffjord,
    ffjord_multiscale,
    flow_matching_loss,
    ot_pairing,
    prior_coupling,
)
from tests.contract import perturb

F64 = torch.float64


def _adam_fm(flow: torch.nn.Module, sample: Callable[[int], Tensor], steps: int, lr: float, **options: object) -> None:
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        flow_matching_loss(flow, sample(256), **options).backward()  # type: ignore[arg-type]
        optimizer.step()


def _exact_nll(flow: FFJORD | FlowStack, x: Tensor) -> float:
    shape = x.shape[1:]
    base = dist.Normal(torch.zeros(shape, dtype=x.dtype), 1.0).to_event(len(shape))
    flow.eval()  # the exact trace (every block here has at most 16 entries)
    with torch.no_grad():
        value = -dist.TransformedDistribution(base, [flow]).log_prob(x).mean().item()
    flow.train()
    return value


# -- the field at a time per sample ----------------------------------------------------------------------------
@pytest.mark.parametrize("context_dim", [0, 3])
def test_fields_take_a_time_per_sample(context_dim: int) -> None:
    torch.manual_seed(0)
    nets = [ODENet(2, [8, 8], context_dim, zero_init=False), ConvODENet((2, 3, 3), [4], context_dim, zero_init=False)]
    for net in nets:
        perturb(net, 0.3)
        z = torch.randn(5, *net.event_shape)
        t = torch.rand(5)
        c = torch.randn(5, 3) if context_dim else None
        rows = [net(t[i], z[i : i + 1], None if c is None else c[i : i + 1]) for i in range(5)]
        assert torch.allclose(net(t, z, c), torch.cat(rows), atol=1e-6)


# -- the minimiser: Gaussian to Gaussian -----------------------------------------------------------------------
M, S = torch.tensor([2.0, -1.0], dtype=F64), 0.5


def _gaussian_moments(s: Tensor, sigma_min: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For x0 ~ N(0, I), x1 ~ N(M, S² I) independent and the linear path: E[u], cov(u, x_s), var(x_s), var(u)."""
    a = 1 - (1 - sigma_min) * s
    return M, s * S**2 - (1 - sigma_min) * a, a**2 + s**2 * S**2, torch.full_like(s, S**2 + (1 - sigma_min) ** 2)


class GaussianField(ODENet):
    """The optimal field of the linear path between N(0, I) and N(M, S² I), in the time of a CNF of length t1.

    ``E[u | x_s] = E[u] + cov(u, x_s) / var(x_s) (x_s - s M)`` per coordinate (jointly Gaussian), and the
    field at time ``t = t1 s`` is that velocity divided by ``t1``; ``shift`` adds a constant.
    """

    def __init__(self, t1: float, sigma_min: float, shift: Tensor | None = None) -> None:
        super().__init__(2, [1])
        self.t1, self.sigma_min = t1, sigma_min
        self.shift = torch.zeros(2, dtype=F64) if shift is None else shift

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        s = (t / self.t1)[:, None]
        mean, cov, var, _ = _gaussian_moments(s, self.sigma_min)
        return (mean + cov / var * (z - s * M) + self.shift) / self.t1


def _analytic_minimum(sigma_min: float) -> float:
    """``E_s Σ_i Var[u_i | x_s]``: the loss of the optimal field (trapezoid rule on 20001 points)."""
    s = torch.linspace(0, 1, 20001, dtype=F64)
    _, cov, var, var_u = _gaussian_moments(s, sigma_min)
    return 2 * torch.trapezoid(var_u - cov**2 / var, s).item()


@pytest.mark.parametrize("t1, sigma_min", [(1.0, 0.0), (2.5, 0.0), (0.4, 0.1)])
def test_loss_at_the_optimal_field_is_the_analytic_minimum(t1: float, sigma_min: float) -> None:
    n = 200_000
    x = M + S * torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(1))

    def per_sample_loss(shift: Tensor | None) -> Tensor:
        flow = FFJORD(GaussianField(t1, sigma_min, shift), t1=t1).to(F64)
        generator = torch.Generator().manual_seed(2)  # the same noise and times for every field
        # the loss of one sample at a time would be slow: take the per-sample terms from a batch of ones
        x0 = torch.randn(n, 2, dtype=F64, generator=generator)
        losses = [
            flow_matching_loss(flow, x[i : i + 10_000], x0=x0[i : i + 10_000], sigma_min=sigma_min, generator=generator)
            for i in range(0, n, 10_000)
        ]
        return torch.stack(losses)

    best = per_sample_loss(None)
    expected = _analytic_minimum(sigma_min)
    # 20 chunk means of 10000 samples each: their spread gives the Monte-Carlo error of the mean
    error = best.std().item() / math.sqrt(len(best))
    assert abs(best.mean().item() - expected) < 5 * error + 1e-3, (best.mean().item(), expected, error)
    # any other field costs more, by E‖shift‖² exactly (the target's conditional mean is the optimal field)
    shift = torch.tensor([0.3, -0.2], dtype=F64)
    excess = (per_sample_loss(shift) - best).mean().item()
    assert excess == pytest.approx(shift.square().sum().item(), rel=0.03)


def test_a_trained_field_approaches_the_optimal_one() -> None:
    torch.manual_seed(0)
    flow = ffjord(2, [32, 32], t1=2.0).to(F64)
    data = torch.Generator().manual_seed(3)
    _adam_fm(flow, lambda n: M + S * torch.randn(n, 2, dtype=F64, generator=data), 600, 1e-2)
    # the excess loss over the analytic minimum is E‖f - f*‖² (in local time): measure it on a big batch
    x = M + S * torch.randn(100_000, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loss = flow_matching_loss(flow, x, generator=torch.Generator().manual_seed(5)).item()
    minimum = _analytic_minimum(0.0)
    at_start = M.square().sum().item() + 2 * (S**2 + 1)  # the zero field's loss, E‖x1 - x0‖²
    assert loss - minimum < 0.02 * (at_start - minimum), (loss, minimum, at_start)  # 98% of the excess gone
    # and its flow carries the base close to N(M, S² I)
    flow.eval()
    with torch.no_grad():
        y = flow(torch.randn(4000, 2, dtype=F64))
    assert torch.allclose(y.mean(0), M, atol=0.15), y.mean(0)
    assert torch.allclose(y.std(0), torch.full((2,), S, dtype=F64), atol=0.05), y.std(0)


# -- training on a 2D toy lowers the exact NLL; then maximum likelihood fine-tunes ------------------------------
@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_flow_matching_lowers_the_exact_test_nll_on_a_toy(coupling: str) -> None:
    torch.manual_seed(0)
    flow = ffjord(2, [64, 64, 64], rtol=1e-5, atol=1e-5)
    data = torch.Generator().manual_seed(0)
    test = sample_toy("8gaussians", 500, generator=torch.Generator().manual_seed(1))
    before = _exact_nll(flow, test)  # the identity: the standard Normal's NLL of the data
    _adam_fm(flow, lambda n: sample_toy("8gaussians", n, generator=data), 300, 5e-3, coupling=coupling)
    after = _exact_nll(flow, test)
    assert after < before - 1.5, (before, after)  # 8gaussians: 5.9 nats at the identity, 3.8 after


def test_maximum_likelihood_fine_tunes_a_flow_matched_flow() -> None:
    torch.manual_seed(0)
    flow = ffjord(2, [32, 32], train_t1=True)
    data = torch.Generator().manual_seed(0)
    _adam_fm(flow, lambda n: sample_toy("moons", n, generator=data), 50, 5e-3)
    assert flow.end_time.sqrt_t1.grad is None  # flow matching leaves t1 alone
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, [flow])
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in flow.parameters()]
    for _ in range(2):
        optimizer.zero_grad()
        loss = -d.log_prob(sample_toy("moons", 128, generator=data)).mean()
        loss.backward()
        assert flow.end_time.sqrt_t1.grad is not None and flow.nfe_adjoint > 0
        optimizer.step()
    assert math.isfinite(loss.item())
    assert all(not torch.equal(a, b) for a, b in zip(before, flow.parameters()))


def test_the_methods_delegate_to_the_function() -> None:
    torch.manual_seed(0)
    flow = ffjord(2, [8], zero_init=False)
    x = torch.randn(16, 2)
    a = flow.flow_matching_loss(x, coupling="ot", generator=torch.Generator().manual_seed(0))
    b = flow_matching_loss(flow, x, coupling="ot", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    conditional = conditional_ffjord(2, 3, [8], zero_init=False)
    c = torch.randn(16, 3)
    a = conditional.flow_matching_loss(x, c, path="cosine", generator=torch.Generator().manual_seed(0))
    b = flow_matching_loss(conditional, x, c, path="cosine", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


# -- conditional flows -----------------------------------------------------------------------------------------
def test_the_context_reaches_the_field_and_training_fits_the_conditionals() -> None:
    torch.manual_seed(0)
    flow = conditional_ffjord(1, 1, [32, 32])
    data = torch.Generator().manual_seed(0)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        c = torch.randint(0, 2, (n, 1), generator=data).float() * 2 - 1  # x | c ~ N(2 c, 0.3²)
        return 2 * c + 0.3 * torch.randn(n, 1, generator=data), c

    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        flow_matching_loss(flow, *sample(256)).backward()
        optimizer.step()
    x, c = sample(1000)
    base = dist.Normal(torch.zeros(1), 1.0).to_event(1)
    flow.eval()
    with torch.no_grad():
        right = -dist.ConditionalTransformedDistribution(base, [flow]).condition(c).log_prob(x).mean().item()
        wrong = -dist.ConditionalTransformedDistribution(base, [flow]).condition(-c).log_prob(x).mean().item()
    true = 0.5 * math.log(2 * math.pi * 0.3**2) + 0.5
    assert right < true + 0.15 and wrong > right + 5, (right, wrong, true)


# -- OT pairing ------------------------------------------------------------------------------------------------
def _cost(x0: Tensor, x1: Tensor) -> float:
    return (x0 - x1).square().sum().item()


def test_ot_pairing_is_the_optimal_permutation_of_the_batch() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x0, x1 = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g) + 1
        perm = ot_pairing(x0, x1)
        assert sorted(perm.tolist()) == list(range(6))
        brute = min(_cost(x0[list(p)], x1) for p in itertools.permutations(range(6)))
        assert _cost(x0[perm], x1) == pytest.approx(brute, abs=1e-5)
        assert _cost(x0[perm], x1) < _cost(x0, x1)
    x0, x1 = torch.randn(512, 2, 3, generator=g), torch.randn(512, 2, 3, generator=g)  # any event shape
    perm = ot_pairing(x0, x1)
    assert torch.equal(perm.sort().values, torch.arange(512)) and _cost(x0[perm], x1) < 0.7 * _cost(x0, x1)


def test_ot_pairing_stays_within_groups() -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    groups = torch.tensor([0, 1, 0, 1, 1, 0, 2, 1])
    perm = ot_pairing(x0, x1, groups)
    assert torch.equal(groups[perm], groups)
    for label in groups.unique():
        members = (groups == label).nonzero()[:, 0]
        brute = min(_cost(x0[members[list(p)]], x1[members]) for p in itertools.permutations(range(len(members))))
        assert _cost(x0[perm[members]], x1[members]) == pytest.approx(brute, abs=1e-5)


def test_ot_without_scipy_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"coupling='ot' needs SciPy.*pip install scipy"):
        flow_matching_loss(ffjord(2, [4]), torch.randn(8, 2), coupling="ot")
    assert torch.isfinite(flow_matching_loss(ffjord(2, [4]), torch.randn(8, 2)))  # the rest does not need it


def test_the_ot_loss_is_the_loss_of_the_ot_pairs() -> None:
    torch.manual_seed(0)
    flow = conditional_ffjord(2, 1, [8], zero_init=False)
    x, x0 = torch.randn(32, 2), torch.randn(32, 2)
    c = torch.randint(0, 3, (32, 1)).float()
    ot = flow_matching_loss(flow, x, c, coupling="ot", x0=x0, generator=torch.Generator().manual_seed(1))
    groups = c[:, 0].long()
    paired = x0[ot_pairing(x0, x, groups)]
    expected = flow_matching_loss(flow, x, c, x0=paired, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ot, expected)
    assert not torch.equal(ot, flow_matching_loss(flow, x, c, x0=x0, generator=torch.Generator().manual_seed(1)))


# -- the multiscale path ---------------------------------------------------------------------------------------
class PairField(ConvODENet):
    """A field that, for sample n, returns the velocity ``velocity(s)[n]`` of a given path (not reading z)."""

    def __init__(self, shape: tuple[int, ...], t1: float, velocity: Callable[[Tensor], Tensor]) -> None:
        super().__init__(shape, [1])  # type: ignore[arg-type]
        self.t1, self.velocity = t1, velocity

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        s = (t / self.t1).reshape(-1, 1).expand(z.shape[0], 1)
        return self.velocity(s).reshape(z.shape) / self.t1 + 0 * z  # reads z (with zero weight) for the trace


def _install_exact_velocities(flow: FlowStack, x0: Tensor, x1: Tensor, path: str, rate_of: Callable) -> None:  # type: ignore[type-arg]
    """Replace every block's field by the exact conditional velocity of the pairs (x0[n], x1[n])."""
    n = x0.shape[0]
    a, b = x0.reshape(n, -1), x1.reshape(n, -1)
    for segment in block_segments(flow):
        entries = segment.index.reshape(-1)
        start, rate = segment.start.reshape(-1), rate_of(segment).reshape(-1)
        t1 = segment.block.end_time().item()
        a_k, b_k = a[:, entries], b[:, entries]

        def velocity(
            s: Tensor, a_k: Tensor = a_k, b_k: Tensor = b_k, start: Tensor = start, rate: Tensor = rate
        ) -> Tensor:
            if path == "linear":
                return rate * (b_k - a_k)
            angle = math.pi / 2 * (start + s * rate)
            return rate * math.pi / 2 * (angle.cos() * b_k - angle.sin() * a_k)

        segment.block.net = PairField(tuple(segment.block.net.event_shape), t1, velocity).to(x0)


@pytest.mark.parametrize(
    "shape, levels, blocks, path, t1",
    [((1, 4, 4), 1, 2, "linear", 1.0), ((2, 8, 8), 2, 1, "linear", 0.5), ((1, 4, 4), 1, 1, "cosine", 0.5)],
)
def test_the_blocks_run_on_their_targets_carry_the_noise_to_the_data(
    shape: tuple[int, int, int], levels: int, blocks: int, path: str, t1: float
) -> None:
    flow = ffjord_multiscale(
        shape, levels=levels, blocks_per_scale=blocks, hidden_channels=[4], t1=t1, rtol=1e-9, atol=1e-9
    ).to(F64)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(3, *shape, dtype=F64, generator=g), torch.randn(3, *shape, dtype=F64, generator=g)
    with torch.no_grad():
        z0 = flow.inv(x0)  # the fields start at zero: the stack is its squeezes and splits, a permutation
    _install_exact_velocities(flow, x0, x1, path, lambda segment: segment.rate)
    if path == "linear":  # the loss is zero at the exact velocities of these pairs: the same targets
        assert flow_matching_loss(flow, x1, x0=x0).item() < 1e-20
    with torch.no_grad():
        assert torch.allclose(flow(z0), x1, atol=1e-6)
    # A schedule that gives every block the same share 1 / K of every coordinate's path would not:
    # the factored-out entries, seen by fewer blocks, would stop short of the data.
    segments = block_segments(flow)
    _install_exact_velocities(flow, x0, x1, "linear", lambda segment: torch.full_like(segment.rate, 1 / len(segments)))
    with torch.no_grad():
        assert not torch.allclose(flow(z0), x1, atol=1e-2)


def test_the_segments_of_a_multiscale_flow() -> None:
    flow = ffjord_multiscale((1, 4, 4), levels=1, blocks_per_scale=2, hidden_channels=[4])
    segments = block_segments(flow)
    assert [tuple(s.index.shape) for s in segments] == [(2, 2, 2)] * 2 + [(4, 2, 2)] * 2 + [(1, 4, 4)] * 2
    kept = segments[0].index.reshape(-1)
    for k, segment in enumerate(segments):
        entries, rate, start = segment.index.reshape(-1), segment.rate.reshape(-1), segment.start.reshape(-1)
        assert sorted(entries.tolist()) == (sorted(kept.tolist()) if k < 2 else list(range(16)))
        inner = torch.isin(entries, kept)
        assert torch.allclose(rate[inner], torch.tensor(1 / 6)) and torch.allclose(rate[~inner], torch.tensor(1 / 4))
        assert torch.allclose(start[inner], torch.tensor(k / 6)) and torch.allclose(
            start[~inner], torch.tensor((k - 2) / 4)
        )
    # the kept entries are those of the first half of the channels after one squeeze
    squeezed = Squeeze((1, 4, 4))(torch.arange(16.0).reshape(1, 4, 4))
    assert sorted(kept.tolist()) == sorted(squeezed[:2].reshape(-1).long().tolist())


def test_flow_matching_lowers_the_exact_nll_of_a_multiscale_cnf() -> None:
    torch.manual_seed(0)
    # tiny Gaussian images, pixels correlated along rows and columns: x = 0.6 L z Lᵀ + 0.5, z ~ N(0, I)
    cov = torch.exp(-((torch.arange(4.0)[:, None] - torch.arange(4.0)) ** 2) / 2) + 0.05 * torch.eye(4)
    mixing = torch.linalg.cholesky(cov)
    true_nll = 8 * math.log(2 * math.pi * math.e) + torch.logdet(0.6 * torch.kron(mixing, mixing)).item()
    data = torch.Generator().manual_seed(0)

    def sample(n: int) -> Tensor:
        return 0.6 * mixing @ torch.randn(n, 1, 4, 4, generator=data) @ mixing.T + 0.5

    flow = ffjord_multiscale((1, 4, 4), levels=1, blocks_per_scale=1, hidden_channels=[16], rtol=1e-5, atol=1e-5)
    test = sample(256)
    before = _exact_nll(flow, test)  # 19.7 nats at the identity
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        flow_matching_loss(flow, sample(128)).backward()
        optimizer.step()
    after = _exact_nll(flow, test)
    assert after < true_nll + 0.75 < before, (before, after, true_nll)  # 9.8 against 9.55


# -- bad input -------------------------------------------------------------------------------------------------
def test_bad_input_gets_a_clear_error() -> None:
    flow = ffjord(2, [4])
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match=r"path: expected one of \['linear', 'cosine'\], got 'vp'"):
        flow_matching_loss(flow, x, path="vp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"coupling: expected one of \['independent', 'ot'\]"):
        flow_matching_loss(flow, x, coupling="sinkhorn")  # type: ignore[arg-type]
    for bad in (-0.1, 1.0, True, "0"):
        with pytest.raises(ValueError, match=r"sigma_min: expected a number in \[0, 1\)"):
            flow_matching_loss(flow, x, sigma_min=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the cosine path ends at the data, expected sigma_min = 0"):
        flow_matching_loss(flow, x, path="cosine", sigma_min=0.1)
    with pytest.raises(ValueError, match=r"x: expected a tensor whose trailing \(event\) shape is \(2,\)"):
        flow_matching_loss(flow, torch.randn(8, 3))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        flow_matching_loss(flow, torch.ones(8, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="x: expected finite values"):
        flow_matching_loss(flow, torch.full((8, 2), math.nan))
    with pytest.raises(ValueError, match=r"x: expected at least one sample"):
        flow_matching_loss(flow, torch.randn(0, 2))
    with pytest.raises(ValueError, match=r"x0: expected the shape of x, \(8, 2\), got \(4, 2\)"):
        flow_matching_loss(flow, x, x0=torch.randn(4, 2))
    with pytest.raises(ValueError, match="takes no context"):
        flow_matching_loss(flow, x, torch.randn(8, 1))
    with pytest.raises(ValueError, match="ConditionalFFJORD needs a context, got None"):
        flow_matching_loss(conditional_ffjord(2, 1, [4]), x)
    with pytest.raises(ValueError, match=r"context: expected a tensor whose trailing \(event\) shape is \(1,\)"):
        flow_matching_loss(conditional_ffjord(2, 1, [4]), x, torch.randn(8, 2))
    with pytest.raises(ValueError, match="context: its batch shape"):
        flow_matching_loss(conditional_ffjord(2, 1, [4]), x, torch.randn(3, 1))
    with pytest.raises(TypeError, match="flow: expected an FFJORD transform or a FlowStack of them, got Linear"):
        flow_matching_loss(torch.nn.Linear(2, 2), x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ot_pairing: expected x0 and x1 of the same shape"):
        ot_pairing(torch.randn(4, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"ot_pairing: expected integer groups of shape \(4,\)"):
        ot_pairing(torch.randn(4, 2), torch.randn(4, 2), torch.zeros(4))


def _block(shape: tuple[int, ...]) -> FFJORD:
    net = ODENet(shape[0], [4]) if len(shape) == 1 else ConvODENet(shape, [4])
    return FFJORD(net, options=ODEOptions())


def test_unsupported_stacks_get_a_clear_error() -> None:
    images = torch.randn(4, 1, 4, 4)
    prior = FlowStack(
        [Squeeze((1, 4, 4)), FactorOut((4, 2, 2), _block((2, 2, 2)), prior_coupling((4, 2, 2))), _block((4, 2, 2))]
    )
    with pytest.raises(ValueError, match="FactorOut with a learned prior"):
        flow_matching_loss(prior, torch.randn(4, 4, 2, 2))
    with pytest.raises(ValueError, match="got a part of type ActNorm"):
        flow_matching_loss(FlowStack([_block((1, 4, 4)), ActNorm((1, 4, 4))]), images)
    with pytest.raises(ValueError, match="has no FFJORD block to train"):
        flow_matching_loss(FlowStack([Squeeze((1, 4, 4)), InverseTransformModule(Squeeze((1, 4, 4)))]), images)
    # a block that sees half the data after one that moved all of it: the path does not split into blocks
    late = FlowStack(
        [
            Squeeze((1, 4, 4)),
            _block((4, 2, 2)),
            FactorOut((4, 2, 2), _block((2, 2, 2))),
            InverseTransformModule(Squeeze((1, 4, 4))),
        ]
    )
    with pytest.raises(
        ValueError, match="block 1 .* does not see 8 data coordinates that earlier blocks already moved"
    ):
        flow_matching_loss(late, images)
    with pytest.raises(ValueError, match="coupling='ot': block 0 .* sees only part of the data"):
        multiscale = ffjord_multiscale((1, 4, 4), levels=1, blocks_per_scale=1, hidden_channels=[4])
        flow_matching_loss(multiscale, images, coupling="ot")
    # every block seeing every coordinate: OT pairing is allowed
    full = FlowStack([_block((2,)), _block((2,))])
    assert torch.isfinite(flow_matching_loss(full, torch.randn(8, 2), coupling="ot"))
    assert [s.rate.tolist() for s in block_segments(full)] == [[0.5, 0.5], [0.5, 0.5]]
