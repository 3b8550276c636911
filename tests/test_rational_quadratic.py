"""Tests of the rational-quadratic spline map: identity at zero, inverse, log-derivative, stability, validation.

Tolerances in float32 follow the conditioning of the problem: an input rounded to one ulp
of ``B + |y|`` and knots rounded to one ulp of ``B`` move the inverse by
``eps (B + |y|) (1 + 1 / g')``; the forward by ``eps (B + |y|) (1 + g')``. The tests allow
8 such units (the largest ratio measured over a million random points is about 4.3).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from pyro_nf.transforms.elementwise import ElementwiseMap
from pyro_nf.transforms.rational_quadratic import RationalQuadraticSpline

DTYPES = [torch.float32, torch.float64]
UNITS = 8.0


def _params(g: RationalQuadraticSpline, *shape: int, scale: float = 3.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Raw parameters ``N(0, scale^2)`` of shape ``(P, *shape)``, rounded to float32 so both dtypes see the same."""
    return (torch.randn(g.num_params, *shape, dtype=torch.float64) * scale).float().to(dtype)


def _inputs(g: RationalQuadraticSpline, knots: Tensor, n: int = 64) -> Tensor:
    """Inputs ``(n + K + 6, D)``: random ones, the knots ``knots`` (``(D, K + 1)``) exactly, ``±B`` and the tails.

    The last four rows are in the tails, ``±1e20`` among them (its square overflows float32).
    """
    b, d = g.bound, knots.shape[0]
    edges = torch.tensor([-b, b, -1e20, -2 * b, 1.5 * b, 1e20], dtype=knots.dtype)[:, None].expand(6, d)
    return torch.cat([torch.randn(n, d, dtype=knots.dtype) * 0.6 * b, knots.T, edges])


def _extreme(g: RationalQuadraticSpline) -> Tensor:
    """Legal extreme parameters ``(P, 4)``: one bin with nearly all width / height / both; least derivatives."""
    k = g.bins
    p = torch.zeros(g.num_params, 4, dtype=torch.float64)
    p[2 * k :] = -30.0
    p[3, [0, 2]] = 30.0  # one wide bin
    p[k + 5, [1, 2]] = 30.0  # one tall bin
    p[2 * k :: 2, 3] = 30.0  # knots alternating between the least and a steep derivative
    return p


def test_protocol_and_layout() -> None:
    g = RationalQuadraticSpline(bins=5)
    assert isinstance(g, ElementwiseMap)
    assert (g.num_params, g.volume_preserving) == (14, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.bins = 3  # type: ignore[misc]
    xs, ys, ds = g.knots(_params(g, 3, 2))
    assert xs.shape == ys.shape == ds.shape == (3, 2, 6)
    for knots, minimum in ((xs, g.min_width), (ys, g.min_height)):
        assert (knots[..., 0] == -g.bound).all() and (knots[..., -1] == g.bound).all()
        assert (knots.diff(dim=-1) >= 2 * g.bound * minimum * (1 - 1e-9)).all()
    assert (ds[..., [0, -1]] == 1).all() and (ds >= g.min_derivative * (1 - 1e-12)).all()
    assert (ds <= (1 + 1e-12) / g.min_derivative).all()


def test_huge_raws_are_squashed_into_bounded_knots() -> None:
    """Raws of any size give derivatives in ``(m, 1 / m)`` and bin sizes within a factor 1000 (then the minimum)."""
    g = RationalQuadraticSpline(bins=4, min_derivative=1e-2)
    raw = torch.tensor([1e6, -1e6, 0.0, 0.0, -1e6, 1e6, 0.0, 0.0, 1e6, -1e6, 0.0], dtype=torch.float64)
    xs, ys, ds = g.knots(raw[:, None])
    inner = ds[0, 1:-1]
    torch.testing.assert_close(inner, torch.tensor([1e2, 1e-2, 1.0], dtype=torch.float64), rtol=1e-4, atol=0)
    assert (inner > 1e-2).all() and (inner < 1e2).all()
    for knots in (xs[0], ys[0]):
        fractions = (knots.diff() / (2 * g.bound) - g.min_width) / (1 - g.bins * g.min_width)
        assert fractions.max() / fractions.min() == pytest.approx(1000.0, rel=1e-4)
    # the map stays smooth: the derivative of the knots in the raws is finite and nonzero for large raws
    r = torch.full((1,), 50.0, dtype=torch.float64, requires_grad=True)
    (g._derivative(r)).sum().backward()
    assert r.grad is not None and 0 < r.grad.item() < float("inf")


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_params_give_the_identity(dtype: torch.dtype) -> None:
    g = RationalQuadraticSpline()
    params = torch.zeros(g.num_params, 1, dtype=dtype)
    xs, ys, ds = g.knots(params)
    assert torch.equal(xs, ys) and torch.equal(ds, torch.ones_like(ds))
    x = torch.cat([torch.linspace(-3 * g.bound, 3 * g.bound, 20001, dtype=dtype), xs[0]])
    for fn in (g.forward, g.inverse):
        y, ladj = fn(x, params)
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
        torch.testing.assert_close(ladj, torch.zeros_like(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip(dtype: torch.dtype) -> None:
    g = RationalQuadraticSpline()
    eps = torch.finfo(dtype).eps
    params = _params(g, 300, dtype=dtype)
    xs, ys, _ = g.knots(params)
    x = torch.cat([_inputs(g, xs), ys.T])  # the y-knots as inputs of the inverse below
    y, ladj = g.forward(x, params)
    x_back, ladj_back = g.inverse(y, params)
    # Forward -> inverse: the inverse amplifies the rounding of y by 1 / g' (the least of the two ends).
    slope = torch.minimum(ladj, ladj_back).exp()
    assert (x_back - x).abs().le(UNITS * eps * (g.bound + y.abs()) * (1 + 1 / slope)).all()
    # Inverse -> forward: the forward amplifies the rounding of x by g'.
    x2, ladj2 = g.inverse(x, params)
    y2, _ = g.forward(x2, params)
    assert (y2 - x).abs().le(UNITS * eps * (g.bound + x.abs()) * (1 + ladj2.exp())).all()
    if dtype == torch.float64:
        well = ladj.exp() >= 1e-3  # 1 / g' up to 1e6 in flat bins puts any algorithm above 1e-10 there
        assert well.float().mean() > 0.5
        torch.testing.assert_close(x_back[well], x[well], rtol=0, atol=1e-10)
        torch.testing.assert_close(y2, x, rtol=0, atol=1e-10)
    tails = x.abs() > g.bound
    assert torch.equal(y[tails], x[tails]) and (ladj[tails] == 0).all()


def test_log_derivative_matches_autograd() -> None:
    g = RationalQuadraticSpline(bins=6, bound=3.0)
    params = _params(g, 200)
    xs, ys, _ = g.knots(params)
    for fn, knots in ((g.forward, xs), (g.inverse, ys)):
        x = _inputs(g, knots).requires_grad_()
        y, ladj = fn(x, params)
        (grad,) = torch.autograd.grad(y.sum(), x)
        sign = 1.0 if fn == g.forward else -1.0  # d g^{-1} / dy = 1 / g'
        torch.testing.assert_close(sign * grad.log(), ladj, rtol=0, atol=1e-9)
    # The inverse returns log g' at the x it returns: the forward's value at that x.
    x_inv, ladj_inv = g.inverse(_inputs(g, ys), params)
    torch.testing.assert_close(ladj_inv, g.forward(x_inv, params)[1], rtol=0, atol=1e-9)


def test_monotonic_and_continuous() -> None:
    g = RationalQuadraticSpline(bins=8, bound=2.0)
    params = _params(g, 16)
    x = torch.linspace(-3.0, 3.0, 60001, dtype=torch.float64)[:, None]
    y, _ = g.forward(x, params)
    assert (y.diff(dim=0) > 0).all()
    assert (g.inverse(x, params)[0].diff(dim=0) > 0).all()
    xs, ys, ds = g.knots(params)
    for knots, outputs, fn in ((xs, ys, g.forward), (ys, xs, g.inverse)):
        at, lad = fn(knots.T, params)
        torch.testing.assert_close(at, outputs.T, rtol=0, atol=1e-12)
        torch.testing.assert_close(lad, ds.log().T, rtol=0, atol=1e-9)  # log g' = log delta_k at knot k
        for h in (1e-9, -1e-9):
            assert ((fn(knots.T + h, params)[0] - at).abs() < 1e-5).all()
    # C^1: from either side, log g' tends to log delta_k at knot k (±B and the tails included), linearly
    # in the distance (1000-fold closer gives at least 100-fold closer); the slack is rounding times the slope.
    for side in (1.0, -1.0):
        gaps = [(g.forward(xs.T + side * h, params)[1] - ds.log().T).abs() for h in (1e-9, 1e-12)]
        assert (gaps[1] <= 1e-2 * gaps[0] + 1e-9).all()


def test_broadcasting() -> None:
    g = RationalQuadraticSpline(bins=4)
    params = _params(g, 1, 3)
    x = torch.randn(5, 3, dtype=torch.float64) * 4
    for fn in (g.forward, g.inverse):
        expected = fn(x, params.expand(-1, 5, 3).contiguous())
        got = fn(x, params)
        assert got[0].shape == got[1].shape == (5, 3)
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)  # the softmax may round apart by an ulp
        # Inputs that broadcast against parameters: x (3,), params (P, 5, 3); a scalar x with params (P,).
        many = _params(g, 5, 3)
        torch.testing.assert_close(fn(x[0], many), fn(x[0].expand(5, 3), many), rtol=1e-13, atol=1e-15)
        y, ladj = fn(x[0, 0], params[:, 0, 0])
        assert y.shape == ladj.shape == ()
        torch.testing.assert_close((y, ladj), tuple(t[0, 0] for t in fn(x, params)), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_are_finite(dtype: torch.dtype) -> None:
    g = RationalQuadraticSpline(bins=8, bound=3.0)
    for params in (_params(g, 4, dtype=dtype), _extreme(g).to(dtype)):
        xs, ys, _ = g.knots(params)
        for fn, knots in ((g.forward, xs), (g.inverse, ys)):
            p = params.clone().requires_grad_()
            x = _inputs(g, knots.detach()).requires_grad_()
            y, ladj = fn(x, p)
            grads = torch.autograd.grad(y.sum() + ladj.sum(), (x, p))
            assert all(torch.isfinite(t).all() for t in grads)
            tails = x.detach().abs() > g.bound
            assert (grads[0][tails] == 1).all()
            # Only tail inputs: the output does not depend on the parameters.
            y_tails, ladj_tails = fn(x[-4:], p)
            (grad_p,) = torch.autograd.grad((y_tails + ladj_tails).sum(), p)
            assert (grad_p == 0).all()


def test_gradcheck() -> None:
    g = RationalQuadraticSpline(bins=3, bound=2.0)
    params = _params(g, 4, scale=1.0).requires_grad_()
    x = torch.tensor([[-1.3, 0.2, 1.1, 3.0], [0.7, -2.5, -0.4, 1.9]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(g.forward, (x, params))
    assert torch.autograd.gradcheck(g.inverse, (x, params))


def test_float32_inverse_with_extreme_params() -> None:
    g = RationalQuadraticSpline()
    eps = torch.finfo(torch.float32).eps
    # The extreme parameters, and wide random ones that reach b < 0 in the quadratic (the other root form).
    params32 = torch.cat([_extreme(g), _params(g, 60, scale=4.0)], dim=1).float()
    params = params32.double()
    y = torch.linspace(-1.2 * g.bound, 1.2 * g.bound, 20001)[:, None].expand(-1, params.shape[1])
    y = torch.cat([y, g.knots(params32)[1].T, g.knots(params32)[0].T]).double()
    x64, ladj64 = g.inverse(y, params)
    x32, ladj32 = g.inverse(y.float(), params32)
    assert torch.isfinite(x32).all() and torch.isfinite(ladj32).all()
    assert ladj64.exp().min() < 1e-3 and ladj64.exp().max() > 1e2  # the parameters are extreme indeed
    # Backward stable: the float64 forward of the float32 inverse lands within the rounding of y and of the knots.
    y_back, ladj_back = g.forward(x32.double(), params)
    assert (y_back - y).abs().le(UNITS * eps * (g.bound + y.abs()) * (1 + ladj_back.exp())).all()
    # Hence close in x wherever the inverse is well conditioned (in flat regions 1 / g' amplifies the ulp of y).
    well = ladj64.exp() >= 1e-2
    tolerance = UNITS * eps * (g.bound + y.abs()) * (1 + (-ladj64).exp())
    assert (x32.double() - x64).abs()[well].le(tolerance[well]).all()
    # The forward in float32 stays within the rounding of x and of the knots as well.
    x = x64.float()
    y32, ladj32_fwd = g.forward(x, params32)
    y64, ladj64_fwd = g.forward(x.double(), params)
    assert torch.isfinite(y32).all() and torch.isfinite(ladj32_fwd).all()
    assert (y32.double() - y64).abs().le(UNITS * eps * (g.bound + y64.abs()) * (1 + ladj64_fwd.exp())).all()


def test_matches_zuko_on_the_same_knots() -> None:
    transforms = pytest.importorskip("zuko.transforms")
    g = RationalQuadraticSpline(bins=6, bound=4.0)
    params = _params(g, 7, scale=2.0)
    xs, ys, ds = g.knots(params)
    other = transforms.MonotonicRQSTransform(torch.zeros(7, 6), torch.zeros(7, 6), torch.zeros(7, 5), bound=4.0)
    other.horizontal, other.vertical, other.derivatives = xs, ys, ds  # its knots, overwritten with ours
    x = _inputs(g, xs)
    y, ladj = g.forward(x, params)
    torch.testing.assert_close((y, ladj), other.call_and_ladj(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(g.inverse(x, params)[0], other.inv(x), rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    g = RationalQuadraticSpline()
    params = _params(g, 1, 6)
    x = _inputs(g, g.knots(params)[0][0])
    for fn in (g.forward, g.inverse):
        y, ladj = fn(x.cuda(), params.cuda())
        assert y.device.type == ladj.device.type == "cuda"
        torch.testing.assert_close((y.cpu(), ladj.cpu()), fn(x, params), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"bins": 1}, "bins"),
        ({"bins": 0}, "bins"),
        ({"bins": 2.0}, "bins"),
        ({"bins": True}, "bins"),
        ({"bound": 0.0}, "bound"),
        ({"bound": -1.0}, "bound"),
        ({"bound": float("inf")}, "bound"),
        ({"bound": float("nan")}, "bound"),
        ({"bound": True}, "bound"),
        ({"bound": "5"}, "bound"),
        ({"min_width": 0.0}, "min_width"),
        ({"min_width": 0.125}, "min_width"),
        ({"bins": 4, "min_width": 0.3}, "min_width"),
        ({"min_height": -1e-3}, "min_height"),
        ({"min_height": 0.2}, "min_height"),
        ({"min_derivative": 0.0}, "min_derivative"),
        ({"min_derivative": 1.0}, "min_derivative"),
        ({"min_derivative": float("nan")}, "min_derivative"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        RationalQuadraticSpline(**kwargs)  # type: ignore[arg-type]


def test_bad_params_shape() -> None:
    g = RationalQuadraticSpline(bins=4)
    with pytest.raises(ValueError, match=r"params: expected shape \(11, \.\.\.\)"):
        g.forward(torch.zeros(3), torch.zeros(10, 3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_inverted_swaps_the_directions(dtype: torch.dtype) -> None:
    """``inverted=True`` is ``g^{-1}``: the root forward, the closed form inverse, ``log g'`` negated."""
    g, h = RationalQuadraticSpline(bins=6, bound=3.0), RationalQuadraticSpline(bins=6, bound=3.0, inverted=True)
    params = _params(g, 5, dtype=dtype)
    x = _inputs(g, g.knots(params)[0])
    for (out, ladj), (expected, expected_ladj) in (
        (h.forward(x, params), g.inverse(x, params)),
        (h.inverse(x, params), g.forward(x, params)),
    ):
        assert torch.equal(out, expected) and torch.equal(ladj, -expected_ladj)
    zeros = torch.zeros(h.num_params, 1, dtype=dtype)
    for fn in (h.forward, h.inverse):
        y, ladj = fn(x, zeros)
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
        torch.testing.assert_close(ladj, torch.zeros_like(x), rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="inverted"):
        RationalQuadraticSpline(inverted=1)  # type: ignore[arg-type]
