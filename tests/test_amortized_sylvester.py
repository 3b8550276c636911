"""Amortized Householder Sylvester beyond the contract suite, its VAE example run, and FFJORD's exact log q."""

from __future__ import annotations

from pathlib import Path

import pyro.distributions as dist
import pytest
import torch

from pyro_nf.infer import AmortizedFlowPosterior
from pyro_nf.transforms import ConditionalSylvester, conditional_sylvester
from tests.test_infer_examples import run_example


def _set_diagonals(layer: ConditionalSylvester, raw: float, raw_tilde: float) -> None:
    """Make every data point's ``r_ii = tanh(raw)`` and ``r~_ii = tanh(raw_tilde)`` (the head's diagonal rows)."""
    d = layer.input_dim
    head = layer.net if isinstance(layer.net, torch.nn.Linear) else layer.net.output_layer
    with torch.no_grad():
        for start, value in ((d * d, raw), (d * d + d, raw_tilde)):
            head.weight[start : start + d] = 0.0
            head.bias[start : start + d] = value


@pytest.mark.parametrize("product", [-0.995, 0.995])
def test_near_the_invertibility_bound(product: float) -> None:
    """``r_ii r~_ii`` near -1 (the bound for tanh) and near +1: still invertible, exact log-det."""
    torch.manual_seed(0)
    d = 4
    layer = ConditionalSylvester(d, 3, num_householder=3).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5 * torch.randn_like(p))
    raw = 4.0  # tanh(4) = 0.99933
    raw_tilde = float(torch.atanh(torch.tensor(product / torch.tanh(torch.tensor(raw)).item())))
    _set_diagonals(layer, raw, raw_tilde)
    context = torch.randn(6, 3, dtype=torch.float64)
    t = layer.condition(context)
    r, r_tilde, _, _ = t.sylvester_parameters()
    assert torch.allclose(
        r.diagonal(dim1=-2, dim2=-1) * r_tilde.diagonal(dim1=-2, dim2=-1), torch.tensor(product).double()
    )
    x = 2.0 * torch.randn(6, d, dtype=torch.float64)
    y, log_det = t.forward_and_log_det(x)
    x_back, log_det_back = t.inverse_and_log_det(y)
    assert (x_back - x).abs().max() < 1e-9
    assert (log_det_back - log_det).abs().max() < 1e-9
    for i in range(6):
        ti = layer.condition(context[i])
        jac = torch.autograd.functional.jacobian(lambda v, ti=ti: ti.forward_and_log_det(v)[0], x[i])
        assert abs(torch.linalg.slogdet(jac)[1] - log_det[i]) < 1e-8


def test_starts_at_the_identity_and_learns_r() -> None:
    """The rows giving ``R`` start at zero: the identity, with a non-zero gradient for ``R``."""
    torch.manual_seed(1)
    flow = conditional_sylvester(5, 4, num_transforms=2, num_householder=2)
    context = torch.randn(8, 4)
    x = torch.randn(8, 5)
    y, log_det = flow.condition(context).forward_and_log_det(x)
    assert torch.equal(y, x) and torch.equal(log_det, torch.zeros(8))
    (y.square().sum() - log_det.sum()).backward()
    head = flow[0].net
    assert head.weight.grad is not None and head.weight.grad[:25].abs().sum() > 0


def test_each_data_point_gets_its_own_map() -> None:
    """Amortized: the same ``x`` under two contexts gives two maps; one context per row of a batch."""
    torch.manual_seed(2)
    layer = ConditionalSylvester(3, 2, hidden_dims=[8])
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3)
    contexts = torch.randn(2, 2)
    y_batch = layer.condition(contexts)(x.expand(2, 3))
    assert (y_batch[0] - y_batch[1]).abs().max() > 1e-3
    for i in range(2):
        assert torch.allclose(layer.condition(contexts[i])(x), y_batch[i], atol=1e-6)
    # particles x data points against one context per data point (the IWAE layout)
    z = torch.randn(5, 2, 3)
    y, log_det = layer.condition(contexts).forward_and_log_det(z)
    assert y.shape == (5, 2, 3) and log_det.shape == (5, 2)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_householder"):
        ConditionalSylvester(3, 2, num_householder=0)
    with pytest.raises(ValueError, match="input_dim"):
        ConditionalSylvester(0, 2)
    with pytest.raises(ValueError, match="num_transforms"):
        conditional_sylvester(3, 2, num_transforms=0)


def test_vae_example_with_the_amortized_sylvester_posterior(tmp_path: Path) -> None:
    results = tmp_path / "row.md"
    stdout = run_example(
        "vae_flows.py", "--posterior", "sylvester", "--no-progress", "--max-minutes", "5", "--results", str(results)
    )
    assert "posterior=sylvester prior=normal" in stdout
    row = results.read_text().strip().split("|")
    assert row[1].strip() == "sylvester" and row[4].strip() == "1"  # one (smoke) epoch done
    assert float(row[5]) < 0 and float(row[6]) < 0  # test ELBO, IWAE estimate


def test_ffjord_posterior_scores_with_the_exact_trace_above_d16() -> None:
    """An FFJORD posterior in evaluation mode gives the exact ``log q`` of its own draws, also for D > 16."""
    torch.manual_seed(3)
    d, n = 18, 2
    posterior = AmortizedFlowPosterior("ffjord", d, 3, [8], rtol=1e-9, atol=1e-9).double()
    with torch.no_grad():
        for p in posterior.parameters():
            p.add_(0.3 * torch.randn_like(p))
    posterior.eval()
    loc, scale = torch.randn(n, d, dtype=torch.float64), torch.rand(n, d, dtype=torch.float64) + 0.5
    context = torch.randn(n, 3, dtype=torch.float64)
    q = posterior(loc, scale, context)
    z = q.rsample()
    log_q = q.log_prob(z)  # the cached pass: base log-density minus the solve's log-det
    flow = posterior.flow.condition(context)
    z_base, _ = flow.inverse_and_log_det(z)
    for i in range(n):
        fi = posterior.flow.condition(context[i])
        jac = torch.autograd.functional.jacobian(lambda v, fi=fi: fi.forward_and_log_det(v)[0], z_base[i])
        exact = dist.Normal(loc[i], scale[i]).log_prob(z_base[i]).sum() - torch.linalg.slogdet(jac)[1]
        assert abs(log_q[i] - exact) < 1e-6, (log_q[i].item(), exact.item())
