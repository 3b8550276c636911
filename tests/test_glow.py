"""Glow's blocks and model beyond the shared contract: ActNorm's initialisation, the 1x1 convolution, depth 32."""

from __future__ import annotations

import io

import pyro.distributions as dist
import pytest
import torch

from pyro_nf import ConditionalFlowModel, FlowModel
from pyro_nf.transforms import ActNorm, ConditionalLatentAffine, InvertibleConv1x1, conditional_glow, glow
from pyro_nf.transforms.glow import _mix_channels


def test_actnorm_initialises_on_the_first_training_batch_only() -> None:
    norm = ActNorm((3, 4, 4))
    y = torch.randn(64, 3, 4, 4) * torch.tensor([2.0, 0.5, 4.0])[:, None, None] + 5.0
    norm.eval()
    norm.inverse_and_log_det(y)
    assert not bool(norm.initialised)  # evaluation mode never initialises
    norm.train()
    norm.forward_and_log_det(y)
    assert not bool(norm.initialised)  # nor does the forward (noise to data) direction
    x, log_det = norm.inverse_and_log_det(y)
    assert bool(norm.initialised)
    flat = x.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(flat.std(1, correction=0), torch.ones(3), atol=1e-4)
    assert torch.allclose(log_det, (16 * norm.log_scale.sum()).expand(64))
    assert torch.allclose(norm.log_scale.flatten().exp(), torch.tensor([2.0, 0.5, 4.0]), rtol=0.1)
    before = norm.log_scale.detach().clone()
    norm.inverse_and_log_det(y * 10)  # a second batch does not re-initialise
    assert torch.equal(norm.log_scale.detach(), before)


def test_actnorm_is_safe_for_a_constant_channel() -> None:
    norm = ActNorm((2, 2, 2)).train()
    y = torch.randn(8, 2, 2, 2)
    y[:, 1] = 3.0
    x, log_det = norm.inverse_and_log_det(y)
    assert torch.isfinite(x).all() and torch.isfinite(log_det).all()
    assert norm.log_scale[1].item() == 0.0 and norm.loc[1].item() == 3.0
    assert torch.equal(x[:, 1], torch.zeros(8, 2, 2))


def test_actnorm_is_not_initialised_again_after_loading() -> None:
    norm = ActNorm((2, 2, 2)).train()
    norm.inverse_and_log_det(torch.randn(16, 2, 2, 2) * 3 + 1)
    buffer = io.BytesIO()
    torch.save(norm.state_dict(), buffer)
    buffer.seek(0)
    fresh = ActNorm((2, 2, 2)).train()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert bool(fresh.initialised)
    fresh.inverse_and_log_det(torch.randn(16, 2, 2, 2) * 7 - 4)
    assert torch.equal(fresh.log_scale, norm.log_scale) and torch.equal(fresh.loc, norm.loc)


@pytest.mark.parametrize("lu", [True, False])
def test_conv1x1_log_det_is_hw_log_abs_det(lu: bool) -> None:
    conv = InvertibleConv1x1((4, 3, 5), lu=lu).double()
    with torch.no_grad():
        for p in conv.parameters():
            p.add_(0.3 * torch.randn_like(p))
    w = conv.matrix()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    y, log_det = conv.forward_and_log_det(x)
    expected = 15 * torch.linalg.slogdet(w)[1]
    assert torch.allclose(log_det, expected.expand(2))
    assert torch.allclose(y, torch.nn.functional.conv2d(x, w[:, :, None, None]))
    assert torch.allclose(conv.inverse_matrix() @ w, torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_conv1x1_lu_keeps_its_signs_and_stays_invertible() -> None:
    conv = InvertibleConv1x1((3, 2, 2))
    with torch.no_grad():
        conv.log_s.fill_(-30.0)  # tiny but never zero or sign-flipped
    assert torch.equal(torch.diagonal(conv._upper()).sign(), conv.sign_s)


@pytest.mark.parametrize("layout", ["unbatched", "contiguous", "channels_last", "two_batch_dims", "strided"])
def test_mix_channels_is_a_1x1_convolution_in_every_layout(layout: str) -> None:
    torch.manual_seed(0)
    matrix = torch.randn(4, 4, dtype=torch.float64)
    x = torch.randn(3, 2, 4, 5, 6, dtype=torch.float64)
    x = {
        "unbatched": x[0, 0],
        "contiguous": x[0],
        "channels_last": x[0].contiguous(memory_format=torch.channels_last),
        "two_batch_dims": x,
        "strided": x[0, :, :, ::2],
    }[layout]
    expected = torch.einsum("ij,...jhw->...ihw", matrix, x)
    y = _mix_channels(matrix, x)
    assert y.shape == x.shape
    assert torch.allclose(y, expected, atol=1e-12)


def test_conv1x1_inverse_follows_a_loaded_permutation() -> None:
    torch.manual_seed(0)
    source, target = InvertibleConv1x1((5, 2, 2)).double(), InvertibleConv1x1((5, 2, 2)).double()
    assert not torch.equal(source.permutation, target.permutation)  # two draws of the random rotation
    target.load_state_dict(source.state_dict())
    assert "permutation_t" not in source.state_dict()  # derived, not saved: the checkpoint format is unchanged
    assert torch.equal(target.permutation_t, source.permutation.T)
    identity = torch.eye(5, dtype=torch.float64)
    assert torch.allclose(target.inverse_matrix() @ target.matrix(), identity, atol=1e-12)
    assert torch.allclose(target.inverse_matrix(), torch.linalg.inv(source.matrix()), atol=1e-12)


def test_conv1x1_inverse_trains_only_the_strict_lower_factor() -> None:
    conv = InvertibleConv1x1((4, 2, 2)).double()
    conv.inverse_and_log_det(torch.randn(3, 4, 2, 2, dtype=torch.float64))[0].square().sum().backward()
    assert conv.lower.grad is not None and conv.lower.grad.abs().sum() > 0
    assert torch.equal(conv.lower.grad, conv.lower.grad.tril(-1))


def test_glow_rejects_shapes_that_do_not_divide() -> None:
    with pytest.raises(ValueError, match=r"\(1, 12, 12\).*levels = 3.*divisible by 2\*\*3 = 8"):
        glow((1, 12, 12), levels=3, depth=1, hidden_channels=4)
    with pytest.raises(ValueError, match="input_shape"):
        glow((8, 8), levels=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="coupling"):
        glow((1, 4, 4), levels=1, depth=1, hidden_channels=4, coupling="cubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bins apply to coupling='spline', got coupling='affine'"):
        glow((1, 4, 4), levels=1, depth=1, hidden_channels=4, bins=4)


def test_depth_32_glow_is_finite_both_ways() -> None:
    torch.manual_seed(1)
    flow = glow((1, 8, 8), levels=2, depth=32, hidden_channels=8)
    model = FlowModel(flow, (1, 8, 8)).train()
    x = torch.rand(16, 1, 8, 8)
    log_p = model.log_prob(x)  # initialises every ActNorm on this batch
    assert torch.isfinite(log_p).all()
    model.eval()
    with torch.no_grad():
        z, _ = flow.inverse_and_log_det(x)
        assert torch.isfinite(z).all() and z.abs().max() < 1e3
        assert torch.allclose(flow.forward_and_log_det(z)[0], x, atol=1e-3)
        for temperature in (0.0, 0.7, 1.0):
            sample = model.sample((4,), temperature=temperature)
            assert torch.isfinite(sample).all()


def test_glow_density_is_a_transformed_distribution() -> None:
    flow = glow((2, 4, 4), levels=2, depth=1, hidden_channels=4).eval()
    base = dist.Normal(torch.zeros(2, 4, 4), 1.0).to_event(3)
    d = dist.TransformedDistribution(base, [flow])
    x = torch.randn(5, 2, 4, 4)
    z, log_det = flow.inverse_and_log_det(x)
    assert d.event_shape == (2, 4, 4)
    assert torch.allclose(d.log_prob(x), base.log_prob(z) - log_det, atol=1e-5)


def test_conditional_glow_learns_which_class_an_image_belongs_to() -> None:
    """Two classes of 4x4 images (bright and dark halves swapped): after training, each test image is
    more likely under its own label than under the other."""
    torch.manual_seed(0)
    shape = (1, 4, 4)
    pattern = torch.zeros(shape)
    pattern[..., :2] = 1.0

    def images(labels: torch.Tensor) -> torch.Tensor:
        means = torch.where(labels.bool()[:, None, None, None], pattern, 1.0 - pattern)
        return means + 0.3 * torch.randn(len(labels), *shape)

    model = ConditionalFlowModel(conditional_glow(shape, 2, levels=1, depth=2, hidden_channels=16), shape, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        labels = torch.randint(0, 2, (128,))
        loss = -model.log_prob(images(labels), torch.nn.functional.one_hot(labels, 2).float()).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    labels = torch.randint(0, 2, (200,))
    x = images(labels)
    own = model.log_prob(x, torch.nn.functional.one_hot(labels, 2).float())
    other = model.log_prob(x, torch.nn.functional.one_hot(1 - labels, 2).float())
    assert (own > other).float().mean() > 0.95
    samples = model.condition(torch.eye(2)).sample((200,))  # (200, 2, 1, 4, 4): class 0 and class 1
    left, right = samples[..., :2].mean(dim=(0, 2, 3, 4)), samples[..., 2:].mean(dim=(0, 2, 3, 4))
    assert left[0] < right[0] and left[1] > right[1]  # class 1 is bright on the left


def test_conditional_prior_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="context_dim"):
        ConditionalLatentAffine((1, 4, 4), 0)
    with pytest.raises(ValueError, match="event_shape"):
        ConditionalLatentAffine((1, 0, 4), 2)
    with pytest.raises(ValueError, match="context"):
        ConditionalLatentAffine((1, 4, 4), 2).condition(torch.randn(3, 5))
    with pytest.raises(ValueError, match="levels"):
        conditional_glow((1, 4, 4), 2, levels=3)
