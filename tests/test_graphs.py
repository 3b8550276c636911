"""CUDA graphs (``pyro_nf.graphs``): replays give the eager numbers, see parameter updates, train."""

from __future__ import annotations

import pytest
import torch

from pyro_nf import FlowModel
from pyro_nf.graphs import capture, capture_module, capture_sampler
from pyro_nf.transforms import iaf, maf

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_capture_needs_cuda():
    model = FlowModel(maf(3, [8]), (3,))
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        capture(model.log_prob, torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        capture_module(model, torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        capture_sampler(model, (4,))


def _model(factory, dim: int = 12) -> FlowModel:
    torch.manual_seed(0)
    model = FlowModel(factory(dim, [32, 32], 3), (dim,)).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@cuda
def test_cpu_inputs_are_refused():
    model = _model(maf)
    with pytest.raises(ValueError, match="expected CUDA tensors, got input 0 on cpu"):
        capture(model.log_prob, torch.randn(4, 12))


@cuda
@pytest.mark.parametrize("factory", [maf, iaf], ids=["maf", "iaf"])
def test_captured_density_matches_eager(factory):
    model = _model(factory)
    density = capture(model.log_prob, torch.randn(64, 12, device="cuda"))
    for _ in range(2):  # new inputs on every replay
        x = torch.randn(64, 12, device="cuda")
        with torch.no_grad():
            expected = model.log_prob(x)
        assert torch.allclose(density(x), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="must match the capture"):
        density(torch.randn(65, 12, device="cuda"))


@cuda
@pytest.mark.parametrize("factory", [maf, iaf], ids=["maf", "iaf"])
def test_captured_sampling_draws_fresh_samples(factory):
    model = _model(factory)
    sample = capture_sampler(model, (256,))
    a, b = sample(), sample()
    assert a.shape == (256, 12) and a.device.type == "cuda"
    assert not torch.allclose(a, b), "every replay draws new base noise"
    with torch.no_grad():  # the samples are the flow's: round trip through the parallel direction
        z, _ = model.flow.inverse_and_log_det(a)
        x, _ = model.flow.forward_and_log_det(z)
    assert torch.allclose(x, a, rtol=1e-4, atol=1e-4)


@cuda
def test_replay_sees_parameter_updates():
    model = _model(maf)
    x = torch.randn(32, 12, device="cuda")
    density = capture(model.log_prob, x)
    before = density(x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
        expected = model.log_prob(x)
    after = density(x)
    assert not torch.allclose(after, before)
    assert torch.allclose(after, expected, rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("factory", [maf, iaf], ids=["maf", "iaf"])
def test_captured_training_step_matches_eager_gradients(factory):
    model = _model(factory)
    data = torch.randn(128, 12, device="cuda")
    (-model.log_prob(data).mean()).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    graphed = capture_module(model, data)
    model.zero_grad(set_to_none=True)
    (-graphed(data).mean()).backward()
    for p, g in zip(model.parameters(), expected):
        assert p.grad is not None and torch.allclose(p.grad, g, rtol=1e-3, atol=1e-5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        optimizer.zero_grad(set_to_none=False)
        loss = -graphed(data).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
