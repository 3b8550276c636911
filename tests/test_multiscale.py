"""Squeeze, image couplings, factor-out and the RealNVP multiscale model beyond the shared contract."""

from __future__ import annotations

import pytest
import torch

from pyro_nf.transforms import FactorOut, Squeeze, glow, image_coupling, prior_coupling, realnvp_multiscale, squeeze
from pyro_nf.transforms.image_coupling import checkerboard


def test_squeeze_shapes_and_layout() -> None:
    t = squeeze((3, 4, 6))
    assert t.forward_shape((5, 3, 4, 6)) == (5, 12, 2, 3)
    assert t.inverse_shape((5, 12, 2, 3)) == (5, 3, 4, 6)
    x = torch.randn(5, 3, 4, 6)
    y, log_det = t.forward_and_log_det(x)
    assert y.shape == (5, 12, 2, 3) and torch.equal(log_det, torch.zeros(5))
    # channel c*4 + i*2 + j at (h, w) is input channel c at (2h + i, 2w + j)
    assert torch.equal(y[:, 1 * 4 + 1 * 2 + 0, 1, 2], x[:, 1, 3, 4])
    assert torch.equal(t.inv(y), x)
    assert torch.equal(t.inverse_and_log_det(y)[0], x)
    with pytest.raises(ValueError, match=r"divisible by factor = 2.*\(1, 3, 4\)"):
        Squeeze((1, 3, 4))


def test_checkerboard_coupling_leaves_the_kept_pixels() -> None:
    layer = image_coupling((2, 4, 4), 8, mask="checkerboard", parity=0, network="resnet", num_blocks=1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(3, 2, 4, 4)
    y = layer(x)
    kept = checkerboard(4, 4, 0).bool().expand(2, 4, 4)
    assert torch.equal(y[:, kept], x[:, kept])
    assert not torch.allclose(y[:, ~kept], x[:, ~kept])


def test_channel_coupling_leaves_the_kept_channels() -> None:
    layer = image_coupling((4, 2, 2), 8, parity=1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(3, 4, 2, 2)
    y = layer(x)
    assert torch.equal(y[:, 2:], x[:, 2:]) and not torch.allclose(y[:, :2], x[:, :2])
    with pytest.raises(ValueError, match="at least 2 channels"):
        image_coupling((1, 2, 2), 8)


def test_factor_out_prior_is_glows_conditional_gaussian() -> None:
    inner = image_coupling((2, 2, 2), 4)
    prior = prior_coupling((4, 2, 2))
    layer = FactorOut((4, 2, 2), inner, prior).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(6, 4, 2, 2, dtype=torch.float64)
    noise, log_det = layer.inverse_and_log_det(x)
    # the factored-out noise is (z - mu(h)) / sigma(h), with (mu, log sigma) read from the kept channels h
    a, b = prior.net(x[:, :2]).chunk(2, dim=-3)
    log_sigma = 3.0 * torch.tanh(b / 3.0)
    assert torch.allclose(noise[:, 2:], (x[:, 2:] - a) * torch.exp(-log_sigma))
    inner_noise, inner_log_det = inner.inverse_and_log_det(x[:, :2])
    assert torch.allclose(noise[:, :2], inner_noise)
    assert torch.allclose(log_det, inner_log_det + log_sigma.flatten(1).sum(1))


def test_realnvp_multiscale_rejects_shapes_that_do_not_divide() -> None:
    with pytest.raises(ValueError, match=r"\(1, 6, 6\).*num_scales = 3.*2\*\*2 = 4"):
        realnvp_multiscale((1, 6, 6), num_scales=3, hidden_channels=4)
    with pytest.raises(ValueError, match="num_scales"):
        realnvp_multiscale((1, 4, 4), num_scales=0)


def test_factored_out_channels_are_carried_through_unchanged() -> None:
    # Perturb only the last level: the noise of the channels factored out at the first level must not move.
    flow = glow((1, 4, 4), levels=2, depth=1, hidden_channels=4, learned_prior=False).eval()
    factor_out = flow[1]
    assert isinstance(factor_out, FactorOut)
    x = torch.randn(3, 1, 4, 4)
    z_before = flow.inverse_and_log_det(x)[0]
    with torch.no_grad():
        for p in factor_out.inner.parameters():
            p.add_(0.5 * torch.randn_like(p))
    z_after = flow.inverse_and_log_det(x)[0]
    sq = squeeze((1, 4, 4))
    assert torch.equal(sq(z_before)[:, 2:], sq(z_after)[:, 2:])
    assert not torch.allclose(sq(z_before)[:, :2], sq(z_after)[:, :2])
