"""FFJORD over images: the convolutional concat-squash field, traces over ``(C, H, W)``, the multiscale CNF."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch

import pyro_nf.nn.divergence as divergence
from pyro_nf.nn.divergence import AugmentedDynamics, divergence_exact, divergence_hutchinson, sample_noise
from pyro_nf.nn.odefunc import ConcatSquashConv2d, ConvODENet, ODENet
from pyro_nf.transforms import FFJORD, ConditionalFFJORD, FactorOut, ODEOptions, Squeeze, ffjord_multiscale
from tests.contract import perturb

F64 = torch.float64


def _field(shape: tuple[int, int, int] = (2, 3, 3), **kwargs: object) -> ConvODENet:
    torch.manual_seed(0)
    net = ConvODENet(shape, [6, 5], zero_init=False, **kwargs).to(F64)  # type: ignore[arg-type]
    perturb(net, 0.3)
    return net


def _per_sample_jacobians(net: ConvODENet, t: torch.Tensor, z: torch.Tensor) -> list[torch.Tensor]:
    shape = z.shape[1:]
    return [
        torch.autograd.functional.jacobian(lambda v: net(t, v.reshape(1, *shape)).reshape(-1), z[i].reshape(-1))
        for i in range(z.shape[0])
    ]


# -- the convolutional concat-squash layer and field ---------------------------------


def test_concat_squash_conv_gates_and_shifts_every_channel_by_the_time() -> None:
    torch.manual_seed(0)
    layer = ConcatSquashConv2d(2, 3).to(F64)
    perturb(layer, 0.5)
    x = torch.randn(4, 2, 5, 5, dtype=F64)
    t = torch.tensor(0.7, dtype=F64)
    conv = torch.nn.functional.conv2d(x, layer.conv.weight, layer.conv.bias, padding=1)
    gate = torch.sigmoid(layer.gate.weight[:, 0] * 0.7 + layer.gate.bias)
    shift = layer.shift.weight[:, 0] * 0.7
    expected = conv * gate[:, None, None] + shift[:, None, None]
    assert torch.allclose(layer(t, x), expected, atol=1e-12)
    assert not torch.allclose(layer(torch.tensor(0.1, dtype=F64), x), expected)  # it reads the time


def test_concat_squash_conv_reads_a_per_sample_context() -> None:
    torch.manual_seed(0)
    layer = ConcatSquashConv2d(1, 2, context_dim=3).to(F64)
    x = torch.randn(1, 1, 4, 4, dtype=F64).expand(2, 1, 4, 4)
    context = torch.randn(2, 3, dtype=F64)
    y = layer(torch.tensor(0.5, dtype=F64), x, context)
    assert y.shape == (2, 2, 4, 4) and not torch.allclose(y[0], y[1])
    with pytest.raises(ValueError, match="expected a context of size 3, got None"):
        layer(torch.tensor(0.5), x)


def test_conv_field_zero_init_and_bad_arguments() -> None:
    net = ConvODENet((3, 4, 4), [8], activation="tanh")
    assert net(torch.tensor(0.3), torch.randn(2, 3, 4, 4)).abs().max() == 0
    assert net.event_shape == (3, 4, 4) and net.input_dim == 48
    with pytest.raises(ValueError, match=r"input_shape: expected an image shape \(C, H, W\)"):
        ConvODENet((3, 4), [8])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hidden_channels: expected a non-empty list"):
        ConvODENet((3, 4, 4), [])
    with pytest.raises(ValueError, match="kernel_size: expected a positive odd int"):
        ConvODENet((3, 4, 4), [8], kernel_size=2)
    with pytest.raises(ValueError, match="activation: expected one of"):
        ConvODENet((3, 4, 4), [8], activation="relu")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected an ODENet or a ConvODENet"):
        FFJORD(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


# -- traces over (C, H, W) -----------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 40])  # 40 entries: one Jacobian row per batched product
def test_exact_divergence_over_images_matches_the_autograd_jacobian(
    chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunk is not None:
        monkeypatch.setattr(divergence, "EXACT_TRACE_CHUNK_ELEMENTS", chunk)
    net = _field()
    t = torch.tensor(0.3, dtype=F64)
    z = torch.randn(2, 2, 3, 3, dtype=F64, requires_grad=True)
    trace, frob = divergence_exact(net(t, z), z, create_graph=False, event_dims=3)
    assert trace.shape == (2,)
    for i, jac in enumerate(_per_sample_jacobians(net, t, z.detach())):
        assert torch.allclose(trace[i], jac.trace(), atol=1e-12)
        assert torch.allclose(frob[i], jac.square().sum(), atol=1e-12)


def test_exact_divergence_is_differentiable() -> None:
    # d/dz Tr J(z) from the batched products against finite differences
    net = _field((1, 2, 2))
    t = torch.tensor(0.3, dtype=F64)

    def trace(v: torch.Tensor) -> torch.Tensor:
        v = v.reshape(1, 1, 2, 2).clone().requires_grad_(True)
        with torch.enable_grad():
            return divergence_exact(net(t, v), v, create_graph=True, event_dims=3)[0].sum()

    assert torch.autograd.gradcheck(trace, (torch.randn(4, dtype=F64, requires_grad=True),))


def test_hutchinson_over_images_is_unbiased() -> None:
    net = _field()
    t = torch.tensor(0.5, dtype=F64)
    draws = 3000
    z = torch.randn(1, 2, 3, 3, dtype=F64).expand(draws, 2, 3, 3).clone().requires_grad_(True)
    f = net(t, z)
    exact, _ = divergence_exact(f[:1], z, create_graph=False, event_dims=3)
    estimate, _ = divergence_hutchinson(f, z, sample_noise("rademacher", z), create_graph=False, event_dims=3)
    assert estimate.shape == (draws,) and estimate.std() > 0
    standard_error = estimate.std() / math.sqrt(draws)
    assert abs(estimate.mean() - exact[0]) <= 3 * standard_error, (estimate.mean(), exact, standard_error)


def test_divergence_rejects_bad_event_dims() -> None:
    z = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="event_dims: expected an int in 1 .. 2"):
        divergence_exact(2 * z, z, create_graph=False, event_dims=3)


def test_rnode_integrals_over_images_have_the_batch_shape() -> None:
    flow = FFJORD(_field((1, 2, 2)), options=ODEOptions(trace="exact", kinetic_energy=0.1, jacobian_norm=0.1))
    flow.to(F64).train()
    _, log_det = flow.inverse_and_log_det(torch.randn(3, 4, 1, 2, 2, dtype=F64))
    assert log_det.shape == (3, 4)
    assert flow.kinetic_energy is not None and flow.kinetic_energy.shape == (3, 4)
    assert flow.jacobian_norm is not None and bool((flow.jacobian_norm > 0).all())
    flow.regularization().backward()


def test_image_cnf_adjoint_gradients_match_backpropagation_through_the_solver() -> None:
    grads = []
    x = torch.randn(3, 1, 2, 2, dtype=F64)
    for adjoint in (True, False):
        flow = FFJORD(_field((1, 2, 2)), options=ODEOptions(trace="exact", rtol=1e-9, atol=1e-9, adjoint=adjoint))
        flow.to(F64).train()
        d = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 2, 2, dtype=F64), 1.0).to_event(3), [flow])
        d.log_prob(x).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in flow.parameters()]))  # type: ignore[union-attr]
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6), (grads[0] - grads[1]).abs().max()


def test_conditional_ffjord_over_images() -> None:
    torch.manual_seed(0)
    flow = ConditionalFFJORD(
        ConvODENet((1, 2, 2), [4], context_dim=2, zero_init=False), options=ODEOptions(trace="exact")
    )
    t = flow.condition(torch.randn(3, 2))
    y, log_det = t.forward_and_log_det(torch.randn(3, 1, 2, 2))
    assert y.shape == (3, 1, 2, 2) and log_det.shape == (3,)
    assert torch.allclose(t.inv(y), t.inverse_and_log_det(y)[0])


def test_the_vector_field_keeps_its_event_shape() -> None:
    assert ODENet(3, [4]).event_shape == (3,)
    assert FFJORD(ODENet(3, [4])).domain.event_dim == 1
    assert FFJORD(ConvODENet((1, 2, 2), [4])).domain.event_dim == 3
    flow = FFJORD(ConvODENet((1, 2, 2), [4]))
    with pytest.raises(ValueError, match="shape"):
        flow(torch.randn(2, 1, 2, 3))


# -- the multiscale CNF ---------------------------------------------------------------


def test_ffjord_multiscale_builds_blocks_squeezes_and_factor_outs() -> None:
    flow = ffjord_multiscale((1, 8, 8), levels=2, blocks_per_scale=2, hidden_channels=4)
    blocks = [m for m in flow.modules() if isinstance(m, FFJORD)]
    # scales 1 and 2: 2 blocks before and 2 after the squeeze; the last scale: 2 blocks
    assert sorted(b.net.event_shape for b in blocks) == sorted(
        [
            (1, 8, 8),
            (1, 8, 8),
            (4, 4, 4),
            (4, 4, 4),
            (2, 4, 4),
            (2, 4, 4),
            (8, 2, 2),
            (8, 2, 2),
            (4, 2, 2),
            (4, 2, 2),
        ]
    )
    assert sum(isinstance(m, FactorOut) for m in flow.modules()) == 2
    assert sum(isinstance(m, Squeeze) for m in flow.modules()) == 4  # each squeeze and its undoing
    assert all(len(b.net.layers) == 4 for b in blocks)  # an int width: three hidden layers
    assert flow.domain.event_dim == 3
    x = torch.randn(2, 1, 8, 8)
    y, log_det = flow.forward_and_log_det(x)  # zero-initialised fields: the identity (up to the solver's rounding)
    assert torch.allclose(y, x, atol=1e-5) and torch.equal(log_det, torch.zeros(2))


def test_ffjord_multiscale_density_and_hutchinson_evaluation() -> None:
    torch.manual_seed(0)
    flow = ffjord_multiscale(
        (1, 4, 4), levels=1, blocks_per_scale=1, hidden_channels=[4], zero_init=False, rtol=1e-6, atol=1e-6
    )
    base = dist.Normal(torch.zeros(1, 4, 4), 1.0).to_event(3)
    d = dist.TransformedDistribution(base, [flow])
    x = torch.randn(5, 1, 4, 4)
    flow.eval()  # D = 16 and 8 per block: the exact trace
    exact = d.log_prob(x)
    assert exact.shape == (5,)
    flow.train()  # Hutchinson: an unbiased estimate, differs draw to draw
    with torch.no_grad():
        estimates = torch.stack([d.log_prob(x.clone()) for _ in range(3)])
    assert not torch.allclose(estimates[0], estimates[1])
    assert (estimates - exact).abs().max() < 1.0


def test_ffjord_multiscale_trains() -> None:
    torch.manual_seed(0)
    flow = ffjord_multiscale((1, 4, 4), levels=1, blocks_per_scale=1, hidden_channels=[8], rtol=1e-3, atol=1e-3)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 4, 4), 1.0).to_event(3), [flow])
    data = 0.3 * torch.randn(32, 1, 4, 4) + torch.linspace(-1, 1, 16).reshape(1, 4, 4)
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = -d.log_prob(data).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(input_shape=(1, 6, 6), num_scales=3), r"ffjord_multiscale: input_shape \(1, 6, 6\) does not fit"),
        (dict(input_shape=(1, 4, 4), num_scales=0), "num_scales: expected a positive int, got 0"),
        (dict(input_shape=(1, 4, 4), blocks_per_scale=True), "blocks_per_scale: expected a positive int"),
        (dict(input_shape=(4, 4)), r"input_shape: expected an image shape \(C, H, W\)"),
        (dict(input_shape=(1, 4, 4), hidden_channels=[]), "hidden_channels: expected a non-empty list"),
        (dict(input_shape=(1, 4, 4), trace="exactly"), "trace: expected one of"),
        (dict(input_shape=(1, 4, 4), tolerance=1e-3), r"unknown FFJORD option\(s\) \['tolerance'\]"),
    ],
)
def test_ffjord_multiscale_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ffjord_multiscale(**kwargs)  # type: ignore[arg-type]


def test_augmented_dynamics_sums_over_the_image() -> None:
    net = _field((1, 2, 2))
    z = torch.randn(3, 1, 2, 2, dtype=F64)
    dynamics = AugmentedDynamics(net, "exact", regularize=True, event_dims=3)
    f, trace, kinetic, frob = dynamics(torch.tensor(0.2, dtype=F64), (z, torch.zeros(3, dtype=F64)))
    assert f.shape == z.shape and trace.shape == kinetic.shape == frob.shape == (3,)
    assert torch.allclose(kinetic, f.square().sum((1, 2, 3)))
