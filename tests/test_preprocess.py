"""Dequantization, the logit transform, n-bit reduction and bits per dimension, checked by hand."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from torch.distributions import AffineTransform

from pyro_nf.metrics import bits_per_dim
from pyro_nf.transforms import Logit, dequantize, reduce_bits
from pyro_nf.transforms.preprocess import quantize


def test_bits_per_dim_of_a_case_worked_by_hand() -> None:
    # Data y = 0.5 in every one of D = 4 pixels, K = 2 levels; model y = 0.5 + 0.25 z with z ~ N(0, 1).
    # log p(y) = D (-0.5 log(2 pi) - log 0.25), so bits/dim = 0.5 log2(2 pi) - 2 + 1 = 0.32574...
    base = dist.Normal(torch.zeros(1, 2, 2, dtype=torch.float64), 1.0).to_event(3)
    model = dist.TransformedDistribution(base, [AffineTransform(0.5, 0.25, event_dim=3)])
    y = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    bpd = bits_per_dim(model.log_prob(y), (1, 2, 2), 2)
    assert bpd.item() == pytest.approx(0.5 * math.log2(2 * math.pi) - 1.0, abs=1e-12)
    assert bpd.item() == pytest.approx(0.32574806473616, abs=1e-12)
    # the uniform density on the cube: log2 K bits
    assert bits_per_dim(torch.zeros(3), 784, 256).tolist() == [8.0, 8.0, 8.0]
    with pytest.raises(ValueError, match="n_levels"):
        bits_per_dim(torch.zeros(1), 4, 1)


def test_logit_log_det_matches_the_formula_and_autograd() -> None:
    alpha = 0.05
    t = Logit((4,), alpha=alpha).double()
    z = torch.randn(4, dtype=torch.float64)
    y, log_det = t.forward_and_log_det(z)
    jac = torch.autograd.functional.jacobian(lambda v: t.forward_and_log_det(v)[0], z)
    assert log_det.item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-10)
    s = torch.sigmoid(z)
    assert log_det.item() == pytest.approx((torch.log(s * (1 - s) / (1 - 2 * alpha))).sum().item(), abs=1e-10)
    back, log_det_back = t.inverse_and_log_det(y)
    assert torch.allclose(back, z) and torch.allclose(log_det_back, log_det)
    with pytest.raises(ValueError, match="Logit inverse input: expected values in"):
        t.inv(torch.tensor([0.5, 0.5, 0.5, 2.0], dtype=torch.float64))


def test_dequantize_and_bits_with_the_logit_transform_count_every_log_det() -> None:
    # A flow with the logit transform last gives the density of y on [0, 1): integrating it over the cube
    # of one pixel value (D = 1) gives its probability, whatever the flow.
    t = Logit((1,), alpha=0.05).double()
    base = dist.Normal(torch.zeros(1, dtype=torch.float64), 1.0).to_event(1)
    model = dist.TransformedDistribution(base, [AffineTransform(0.3, 1.5, event_dim=1), t])
    grid = (torch.arange(200000, dtype=torch.float64) + 0.5) / 200000
    mass = model.log_prob(grid[:, None]).exp().mean()
    inside = torch.distributions.Normal(0.3, 1.5).cdf(torch.logit(torch.tensor([0.05, 0.95], dtype=torch.float64)))
    assert mass.item() == pytest.approx((inside[1] - inside[0]).item(), abs=1e-6)


def test_dequantize_range_and_errors() -> None:
    x = torch.tensor([[0, 5, 16]])
    y = dequantize(x, 17, generator=torch.Generator().manual_seed(0))
    assert ((y * 17).floor().long() == x).all()
    assert torch.equal(quantize(y, 17), x)
    with pytest.raises(ValueError, match=r"0 \.\. 16"):
        dequantize(torch.tensor([17]), 17)
    with pytest.raises(ValueError, match="integer"):
        dequantize(torch.tensor([0.5]), 17)


def test_reduce_bits() -> None:
    x = torch.arange(256)
    r = reduce_bits(x, 5)
    assert r.min() == 0 and r.max() == 31 and (r.bincount() == 8).all()
    with pytest.raises(ValueError, match="n_bits"):
        reduce_bits(x, 9)
