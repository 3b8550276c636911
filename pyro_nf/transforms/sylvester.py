"""Sylvester flows: Householder Sylvester layers with an exact log-determinant, amortized or not.

A Householder Sylvester layer (van den Berg et al. 2018) is, with ``Q`` orthogonal (a
product of ``K`` Householder reflections), ``R`` and ``R~`` upper triangular and ``h = tanh``,

.. math::

    y = x + Q R\\, h(\\tilde R Q^\\top x + b), \\qquad
    \\log\\left|\\det \\frac{\\partial y}{\\partial x}\\right|
        = \\sum_i \\log\\left(1 + h'\\big((\\tilde R Q^\\top x + b)_i\\big)\\, r_{ii} \\tilde r_{ii}\\right).

- :class:`ConditionalSylvester` / :func:`conditional_sylvester`: the parameters come from a
  hypernetwork of a context (the encoder's features in a VAE), one set per data point, as
  in the paper's VAE experiments; :class:`ConditionedSylvester` is the layer at a context.
- :class:`HouseholderSylvester` / :func:`sylvester`: the same layer with its parameters
  learned directly (shared by all inputs).
- :class:`ExactSylvester` / :func:`exact_sylvester`: Pyro's own
  :class:`~pyro.distributions.transforms.Sylvester` parametrisation with the exact log-determinant.

Pyro 1.9's ``Sylvester.log_abs_det_jacobian`` returns
``sum log(1 + h' r_ii s_ii)``, which is the log-determinant only when its
orthogonal matrix ``Q`` is the identity: its map is
``y = x + tanh(x S Q^T + b) Q R`` (row vectors), whose Jacobian is
``I + R^T Q^T diag(h') Q S^T``, and ``Q`` does not cancel. It disagrees with the
autograd Jacobian by about the size of the log-det itself, so the ELBO it gives
is not a bound. :class:`ExactSylvester` keeps Pyro's parameters and map and
computes the log-determinant exactly, ``log|det(I + diag(h') Q S^T R^T Q^T)|``,
at ``O(D^3)`` per sample (cheap for VAE latent sizes).

van den Berg et al., "Sylvester Normalizing Flows for Variational Inference", UAI 2018.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import Sylvester
from torch import Tensor, nn

from pyro_nf.checks import check_positive_int
from pyro_nf.conditional import ConditionalFlowStack, ConditionalFlowTransformModule
from pyro_nf.core import FlowStack, FlowTransform, FlowTransformModule
from pyro_nf.nn.nets import MLP

__all__ = [
    "sylvester",
    "exact_sylvester",
    "conditional_sylvester",
    "ExactSylvester",
    "ConditionedSylvester",
    "ConditionalSylvester",
    "HouseholderSylvester",
    "DEFAULT_SYLVESTER_LAYERS",
    "DEFAULT_HOUSEHOLDER",
]

DEFAULT_SYLVESTER_LAYERS = 4
"""Number of layers of a Sylvester flow when ``num_transforms`` is not given."""
DEFAULT_HOUSEHOLDER = 8
"""Householder reflections per Sylvester layer when ``num_householder`` is None."""


class ExactSylvester(Sylvester):
    """Pyro's :class:`~pyro.distributions.transforms.Sylvester` map with the exact log-determinant.

    .. math::

        y = x + \\tanh(x S Q^\\top + b)\\, Q R, \\qquad
        \\log|\\det \\partial y / \\partial x|
            = \\log|\\det(I + \\operatorname{diag}(h') Q S^\\top R^\\top Q^\\top)|,

    with ``Q`` a product of ``count_transforms`` Householder reflections, ``R``,
    ``S`` upper triangular and ``h' = 1 - tanh^2`` at the pre-activation (see the
    module docstring for why Pyro's own log-det is not this).

    Example::

        >>> import torch
        >>> t = ExactSylvester(3, count_transforms=2)
        >>> x = torch.randn(3)
        >>> jac = torch.autograd.functional.jacobian(t, x)
        >>> bool(torch.isclose(t.log_abs_det_jacobian(x, t(x)), torch.linalg.slogdet(jac)[1], atol=1e-5))
        True
    """

    def Q(self, x: Tensor) -> Tensor:  # noqa: N802 (Pyro's name)
        u = self.u()
        q = torch.eye(self.input_dim, dtype=x.dtype, device=x.device)
        for i in range(u.size(-2)):
            q = q - 2.0 * torch.outer(q @ u[i], u[i])
        return q

    def _call(self, x: Tensor) -> Tensor:
        q, r, s = self.Q(x), self.R(), self.S()
        pre = x @ (s @ q.T) + self.b
        y = x + torch.tanh(pre) @ (q @ r)
        m = q @ s.T @ r.T @ q.T
        jac = torch.eye(self.input_dim, dtype=x.dtype, device=x.device) + self.dtanh_dx(pre).unsqueeze(-1) * m
        self._cached_logDetJ = torch.linalg.slogdet(jac)[1]
        return y


def _reflect(unit: Tensor, x: Tensor) -> Tensor:
    """The Householder reflection ``x - 2 v (v . x)`` of ``x`` in the hyperplane normal to the unit vector ``v``."""
    return x - 2.0 * unit * (unit * x).sum(-1, keepdim=True)


def _solve_scalar(a: Tensor, s: Tensor, c: Tensor, target: Tensor) -> Tensor:
    """Solve ``u + a tanh(s u + c) = target`` element-wise, for ``a s > -1`` (a strictly increasing left side).

    Newton's method kept inside the bracket ``[target - |a|, target + |a|]`` (where the
    root lies, as ``|tanh| <= 1``), bisecting whenever a Newton step would leave it.
    """
    lo, hi = target - a.abs(), target + a.abs()
    u = (target - a * torch.tanh(s * target + c)).clamp(lo, hi)
    tol = 4.0 * torch.finfo(target.dtype).eps * (1.0 + target.abs() + a.abs())
    for _ in range(100):
        th = torch.tanh(s * u + c)
        g = u + a * th - target
        if bool((g.abs() <= tol).all()):
            break
        lo = torch.where(g < 0, u, lo)
        hi = torch.where(g > 0, u, hi)
        newton = u - g / (1.0 + a * s * (1.0 - th * th))
        u = torch.where((newton > lo) & (newton < hi), newton, 0.5 * (lo + hi))
    return u


class ConditionedSylvester(FlowTransform):
    """One Householder Sylvester layer with the parameters a context gives: the math of :class:`ConditionalSylvester`.

    With ``Q`` orthogonal (a product of Householder reflections), ``R`` and
    ``R~`` upper triangular, ``b`` a vector, all functions of the context, and
    ``h = tanh`` (column vectors, one set of parameters per data point):

    .. math::

        y = x + Q R\\, h(\\tilde R Q^\\top x + b), \\qquad
        \\log\\left|\\det \\frac{\\partial y}{\\partial x}\\right|
            = \\sum_i \\log\\left(1 + h'\\big((\\tilde R Q^\\top x + b)_i\\big)\\, r_{ii} \\tilde r_{ii}\\right),

    since ``det(I + Q R diag(h') R~ Q^T) = det(I + diag(h') R~ R)`` and ``R~ R`` is
    upper triangular. The diagonals are ``r_ii = tanh(.)``, ``r~_ii = tanh(.)``, so
    ``r_ii r~_ii > -1 >= -1 / max h'`` and the map is invertible. The inverse has no
    closed form; with ``u = Q^T x`` the equation ``Q^T y = u + R h(R~ u + b)`` is
    triangular (entry ``i`` involves ``u_i, ..., u_D`` only), so it is solved by
    back-substitution, one increasing scalar equation per coordinate (safeguarded
    Newton), followed by one Newton step of the whole system that carries the
    gradients (the implicit-function derivative) — ``D`` sequential steps:
    ``parallel = "forward"``, the direction a guide needs.

    Args:
        net: the hypernetwork, context ``(..., C)`` -> ``(..., D*D + 3*D + K*D)``: the triangular
            entries (strictly upper ones of ``R`` from the upper triangle of a ``D x D`` block, of
            ``R~`` from its lower triangle), the raw diagonals of ``R`` and ``R~``, ``b``, and the
            ``K`` Householder vectors.
        context: the context, ``(..., C)``.
        input_dim: ``D``.
        num_householder: ``K``.
    """

    parallel = "forward"

    def __init__(
        self, net: nn.Module, context: Tensor | None, input_dim: int, num_householder: int, cache_size: int = 1
    ) -> None:
        super().__init__(cache_size=cache_size)
        self.net = net
        self.context = context
        self.input_dim = input_dim
        self.num_householder = num_householder
        self.input_shape = (input_dim,)

    def _stamp_sources(self) -> tuple[nn.Module | Tensor | None, ...]:
        return (self.net, self.context)

    def sylvester_parameters(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(R, R~, b, V)`` for the context: ``(..., D, D)`` twice, ``(..., D)``, unit vectors ``(..., K, D)``."""
        d, k = self.input_dim, self.num_householder
        full, diag, diag_tilde, b, v = self.net(self.context).split([d * d, d, d, d, k * d], -1)
        full = full.unflatten(-1, (d, d))
        r = torch.triu(full, 1) + torch.diag_embed(torch.tanh(diag))
        r_tilde = torch.tril(full, -1).transpose(-1, -2) + torch.diag_embed(torch.tanh(diag_tilde))
        v = v.unflatten(-1, (k, d))
        unit = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)  # a zero vector: no reflection
        return r, r_tilde, b, unit

    @staticmethod
    def _q_transpose(unit: Tensor, x: Tensor) -> Tensor:
        for i in range(unit.shape[-2]):  # Q^T = H_K ... H_1
            x = _reflect(unit[..., i, :], x)
        return x

    @staticmethod
    def _q(unit: Tensor, x: Tensor) -> Tensor:
        for i in reversed(range(unit.shape[-2])):  # Q = H_1 ... H_K
            x = _reflect(unit[..., i, :], x)
        return x

    @staticmethod
    def _log_det(pre: Tensor, r: Tensor, r_tilde: Tensor) -> Tensor:
        h_prime = 1.0 - torch.tanh(pre).square()
        return torch.log1p(h_prime * r.diagonal(dim1=-2, dim2=-1) * r_tilde.diagonal(dim1=-2, dim2=-1)).sum(-1)

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r, r_tilde, b, unit = self.sylvester_parameters()
        pre = (r_tilde @ self._q_transpose(unit, x).unsqueeze(-1)).squeeze(-1) + b
        y = x + self._q(unit, (r @ torch.tanh(pre).unsqueeze(-1)).squeeze(-1))
        return y, self._log_det(pre, r, r_tilde)

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        r, r_tilde, b, unit = self.sylvester_parameters()
        target = self._q_transpose(unit, y)
        batch = torch.broadcast_shapes(target.shape[:-1], r.shape[:-2])
        d = self.input_dim
        with torch.no_grad():  # back-substitution, last coordinate first
            tgt, rr, rt, bb = (
                t.detach().expand(*batch, *t.shape[-n:]) for t, n in ((target, 1), (r, 2), (r_tilde, 2), (b, 1))
            )
            u = torch.zeros_like(tgt)
            h = torch.zeros_like(tgt)
            for i in reversed(range(d)):
                c = bb[..., i] + (rt[..., i, i + 1 :] * u[..., i + 1 :]).sum(-1)
                known = (rr[..., i, i + 1 :] * h[..., i + 1 :]).sum(-1)
                u[..., i] = _solve_scalar(rr[..., i, i], rt[..., i, i], c, tgt[..., i] - known)
                h[..., i] = torch.tanh(rt[..., i, i] * u[..., i] + c)
        # one Newton step of the whole (upper-triangular) system: same value, implicit-function gradients
        pre = (r_tilde @ u.unsqueeze(-1)).squeeze(-1) + b
        residual = u + (r @ torch.tanh(pre).unsqueeze(-1)).squeeze(-1) - target
        h_prime = (1.0 - torch.tanh(pre).square()).detach()
        jac = torch.eye(d, dtype=u.dtype, device=u.device) + r.detach() @ (h_prime.unsqueeze(-1) * r_tilde.detach())
        u = u - torch.linalg.solve_triangular(jac, residual.unsqueeze(-1), upper=True).squeeze(-1)
        pre = (r_tilde @ u.unsqueeze(-1)).squeeze(-1) + b
        return self._q(unit, u), self._log_det(pre, r, r_tilde)


def _num_outputs(input_dim: int, num_householder: int) -> int:
    return input_dim * input_dim + 3 * input_dim + num_householder * input_dim


def _r_rows(input_dim: int, num_householder: int) -> Tensor:
    """The raw parameters that give ``R`` (zeroed at the start, so a layer starts at the identity)."""
    d = input_dim
    rows = torch.zeros(_num_outputs(d, num_householder), dtype=torch.bool)
    rows[: d * d] = torch.ones(d, d, dtype=torch.bool).triu(1).reshape(-1)
    rows[d * d : d * d + d] = True
    return rows


def _householder_count(num_householder: int | None) -> int:
    k = DEFAULT_HOUSEHOLDER if num_householder is None else num_householder
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_householder: expected a positive int or None, got {num_householder!r}")
    return k


class ConditionalSylvester(ConditionalFlowTransformModule):
    """An amortized Householder Sylvester layer: a hypernetwork maps the context to per-data-point ``Q, R, R~, b``.

    The Householder Sylvester normalizing flow of van den Berg et al. (2018) with
    its parameters amortized by the encoder, as in the paper's VAE experiments:
    ``.condition(context)`` gives a :class:`ConditionedSylvester` (the math is
    there). The hypernetwork is linear (``hidden_dims`` None, as in the paper) or
    an MLP; the rows that give ``R`` start at zero, so the layer starts at the
    identity while ``R~`` and ``b`` start random (so the gradient with respect to
    ``R`` is not zero).

    Args:
        input_dim: the latent size ``D``.
        context_dim: the size ``C`` of the context.
        hidden_dims: hidden widths of the hypernetwork (None: a linear map).
        num_householder: Householder reflections ``K`` forming ``Q`` (default 8).

    Example::

        >>> import torch
        >>> layer = ConditionalSylvester(4, 6, num_householder=2)
        >>> t = layer.condition(torch.randn(10, 6))
        >>> x = torch.randn(10, 4)
        >>> y, log_det = t.forward_and_log_det(x)
        >>> x_back, _ = t.inverse_and_log_det(y)
        >>> y.shape, log_det.shape, bool(torch.allclose(x_back, x, atol=1e-5))
        (torch.Size([10, 4]), torch.Size([10]), True)

    van den Berg et al., "Sylvester Normalizing Flows for Variational Inference", UAI 2018.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] | None = None,
        num_householder: int | None = None,
    ) -> None:
        super().__init__()
        d = check_positive_int(input_dim, "input_dim")
        self.context_dim = check_positive_int(context_dim, "context_dim")
        k = _householder_count(num_householder)
        out_dim = _num_outputs(d, k)
        self.input_dim, self.num_householder = d, k
        head: nn.Linear
        if hidden_dims:
            self.net: nn.Module = MLP(context_dim, list(hidden_dims), out_dim, zero_init_output=False)
            head = self.net.output_layer  # type: ignore[assignment]
        else:
            self.net = head = nn.Linear(context_dim, out_dim)
        r_rows = _r_rows(d, k)
        with torch.no_grad():
            head.weight[r_rows] = 0.0
            head.bias[r_rows] = 0.0

    def _condition(self, context: Tensor) -> ConditionedSylvester:
        return ConditionedSylvester(self.net, context, self.input_dim, self.num_householder)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, context_dim={self.context_dim}, num_householder={self.num_householder}"


class _SylvesterParameters(nn.Module):
    """The raw parameters of an unconditional Sylvester layer: a "hypernetwork" that ignores its context."""

    def __init__(self, input_dim: int, num_householder: int) -> None:
        super().__init__()
        bound = input_dim**-0.5
        raw = torch.empty(_num_outputs(input_dim, num_householder)).uniform_(-bound, bound)
        raw[_r_rows(input_dim, num_householder)] = 0.0
        self.raw = nn.Parameter(raw)

    def forward(self, context: Tensor | None) -> Tensor:
        return self.raw


class HouseholderSylvester(ConditionedSylvester, FlowTransformModule):
    """A Householder Sylvester layer whose parameters are learned directly (shared by every input).

    The math is :class:`ConditionedSylvester`'s; the layer starts at the identity (``R = 0``).

    Example::

        >>> layer = HouseholderSylvester(3, num_householder=2)
        >>> y, log_det = layer.forward_and_log_det(torch.randn(5, 3))
        >>> log_det.shape
        torch.Size([5])
    """

    def __init__(self, input_dim: int, num_householder: int | None = None, cache_size: int = 1) -> None:
        d = check_positive_int(input_dim, "input_dim")
        k = _householder_count(num_householder)
        super().__init__(_SylvesterParameters(d, k), None, d, k, cache_size)  # type: ignore[arg-type]


def sylvester(
    input_dim: int, num_transforms: int = DEFAULT_SYLVESTER_LAYERS, num_householder: int | None = None
) -> FlowStack:
    """A stack of ``num_transforms`` :class:`HouseholderSylvester` layers (sampling direction in one pass).

    Example::

        >>> flow = sylvester(3, num_transforms=2, num_householder=2)
        >>> flow(torch.randn(4, 3)).shape
        torch.Size([4, 3])
    """
    check_positive_int(num_transforms, "num_transforms")
    return FlowStack([HouseholderSylvester(input_dim, num_householder) for _ in range(num_transforms)])


def exact_sylvester(input_dim: int, count_transforms: int = 1) -> ExactSylvester:
    """An :class:`ExactSylvester`: Pyro's Sylvester parametrisation with the exact log-determinant.

    Example::

        >>> exact_sylvester(3, count_transforms=2)(torch.randn(4, 3)).shape
        torch.Size([4, 3])
    """
    check_positive_int(input_dim, "input_dim")
    check_positive_int(count_transforms, "count_transforms")
    return ExactSylvester(input_dim, count_transforms=count_transforms)


def conditional_sylvester(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int = DEFAULT_SYLVESTER_LAYERS,
    num_householder: int | None = None,
) -> ConditionalFlowStack:
    """A stack of ``num_transforms`` amortized Householder Sylvester layers (:class:`ConditionalSylvester`).

    Example::

        >>> import torch
        >>> flow = conditional_sylvester(3, 5, num_transforms=2, num_householder=3)
        >>> flow.condition(torch.randn(7, 5))(torch.randn(7, 3)).shape
        torch.Size([7, 3])
    """
    check_positive_int(num_transforms, "num_transforms")
    return ConditionalFlowStack(
        [ConditionalSylvester(input_dim, context_dim, hidden_dims, num_householder) for _ in range(num_transforms)]
    )
