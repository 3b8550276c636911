"""Amortized flow posteriors for variational autoencoders.

An encoder maps a data point ``x`` to the parameters of a diagonal Gaussian and
to a context vector ``h``; a conditional flow ``f_h`` turns the Gaussian into
the posterior (Kingma et al. 2016):

.. math::

    z_0 \\sim \\mathcal N(\\mu(x), \\operatorname{diag} \\sigma^2(x)), \\qquad
    z = f_h(z_0), \\qquad
    \\log q(z \\mid x) = \\log \\mathcal N(z_0; \\mu, \\sigma^2)
        - \\log|\\det \\partial f_h / \\partial z_0|.

In a Pyro guide this is one ``pyro.sample`` site::

    def guide(x, idx):
        pyro.module("encoder", encoder)
        pyro.module("posterior", posterior)
        with pyro.plate("data", N, subsample=idx):
            loc, scale, h = encoder(x[idx])
            pyro.sample("z", posterior(loc, scale, h))

:func:`amortized_flow` builds the conditional flow by name: the pyro_nf
``conditional_iaf`` (the IAF posterior of Kingma et al.; sampling and the
density of its own samples in one pass per layer, the right direction for a
guide), ``conditional_maf`` (sampling is sequential in the latent size),
``conditional_realnvp``, ``conditional_ffjord`` (when pyro_nf's FFJORD is
installed), ``"sylvester"`` (:class:`ConditionalSylvester`, the amortized
Householder Sylvester flow of van den Berg et al. 2018: the encoder's context
gives each data point its own ``Q``, ``R``, ``R~`` and ``b``), and Pyro's own
flows as baselines: ``"planar"`` (Pyro's ``ConditionalPlanar``, amortized as in
Rezende & Mohamed 2015) and ``"sylvester-shared"`` (Pyro's ``Sylvester``
parametrisation, whose parameters are shared by all data points: Pyro has no
amortized form).

FFJORD posteriors score their samples with the exact trace in evaluation mode
(``eval_trace="exact"``, ``D`` vector-Jacobian products per function
evaluation) whatever ``D``: an IWAE estimate needs the exact ``log q``, and a
Hutchinson estimate inside the log-sum-exp biases it.

Pyro 1.9's ``Sylvester.log_abs_det_jacobian`` returns
``sum log(1 + h' r_ii s_ii)``, which is the log-determinant only when its
orthogonal matrix ``Q`` is the identity: its map is
``y = x + tanh(x S Q^T + b) Q R`` (row vectors), whose Jacobian is
``I + R^T Q^T diag(h') Q S^T``, and ``Q`` does not cancel. It disagrees with the
autograd Jacobian by about the size of the log-det itself, so the ELBO it gives
is not a bound. :class:`ExactSylvester` keeps Pyro's parameters and map and
computes the log-determinant exactly, ``log|det(I + diag(h') Q S^T R^T Q^T)|``,
at ``O(D^3)`` per sample (cheap for VAE latent sizes); it is what
``"sylvester-shared"`` builds.

Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.
Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016.
van den Berg et al., "Sylvester Normalizing Flows for Variational Inference", UAI 2018.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, cast

import pyro.distributions as dist
import torch
from pyro.distributions import ConditionalTransformModule, constraints
from pyro.distributions.conditional import ConditionalComposeTransformModule, ConditionalTransform
from pyro.distributions.transforms import Sylvester, conditional_planar
from torch import Tensor, nn
from torch.distributions import Transform

from pyro_nf.core import ConditionalFlowStack, FlowTransform, check_context, check_tensor
from pyro_nf.infer.autoguide import flow_factory
from pyro_nf.nn.nets import MLP

PosteriorName = Literal["gaussian", "planar", "sylvester", "sylvester-shared", "iaf", "maf", "realnvp", "ffjord"]
POSTERIORS: tuple[str, ...] = ("gaussian", "planar", "sylvester", "sylvester-shared", "iaf", "maf", "realnvp", "ffjord")

#: Number of layers of the planar and Sylvester posteriors when ``num_transforms`` is None.
DEFAULT_PLANAR_LAYERS = 8
DEFAULT_SYLVESTER_LAYERS = 4
#: Householder reflections per amortized Sylvester layer when ``num_householder`` is None.
DEFAULT_HOUSEHOLDER = 8


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

    def __init__(self, net: nn.Module, context: Tensor, input_dim: int, num_householder: int, cache_size: int = 1):
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

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r, r_tilde, b, unit = self.sylvester_parameters()
        pre = (r_tilde @ self._q_transpose(unit, x).unsqueeze(-1)).squeeze(-1) + b
        y = x + self._q(unit, (r @ torch.tanh(pre).unsqueeze(-1)).squeeze(-1))
        return y, self._log_det(pre, r, r_tilde)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
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


class ConditionalSylvester(ConditionalTransformModule):
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
        for name, value in (("input_dim", input_dim), ("context_dim", context_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        k = DEFAULT_HOUSEHOLDER if num_householder is None else num_householder
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"num_householder: expected a positive int or None, got {num_householder!r}")
        d = input_dim
        out_dim = d * d + 3 * d + k * d
        self.input_dim, self.context_dim, self.num_householder = d, context_dim, k
        head: nn.Linear
        if hidden_dims:
            self.net: nn.Module = MLP(context_dim, list(hidden_dims), out_dim, zero_init_output=False)
            head = self.net.output_layer  # type: ignore[assignment]
        else:
            self.net = head = nn.Linear(context_dim, out_dim)
        r_rows = torch.zeros(out_dim, dtype=torch.bool)
        r_rows[: d * d] = torch.ones(d, d, dtype=torch.bool).triu(1).reshape(-1)
        r_rows[d * d : d * d + d] = True
        with torch.no_grad():
            head.weight[r_rows] = 0.0
            head.bias[r_rows] = 0.0

    def condition(self, context: Tensor) -> ConditionedSylvester:
        check_context(context, self.context_dim, next(self.net.parameters()))
        return ConditionedSylvester(self.net, context, self.input_dim, self.num_householder)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, context_dim={self.context_dim}, num_householder={self.num_householder}"


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
    if not isinstance(num_transforms, int) or isinstance(num_transforms, bool) or num_transforms < 1:
        raise ValueError(f"num_transforms: expected a positive int, got {num_transforms!r}")
    return ConditionalFlowStack(
        [ConditionalSylvester(input_dim, context_dim, hidden_dims, num_householder) for _ in range(num_transforms)]
    )


def amortized_flow(
    kind: PosteriorName,
    latent_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int | None = None,
    **options: Any,
) -> nn.Module | None:
    """The conditional flow of an amortized posterior, by name; None for ``"gaussian"``.

    Args:
        kind: ``"gaussian"`` (no flow), ``"planar"``, ``"sylvester"`` (amortized Householder
            Sylvester, :func:`conditional_sylvester`), ``"sylvester-shared"`` (Pyro's Sylvester
            parametrisation with parameters shared by all data points, :class:`ExactSylvester`),
            ``"iaf"``, ``"maf"``, ``"realnvp"`` or ``"ffjord"``.
        latent_dim: the latent size D.
        context_dim: the size of the encoder's context vector (unused by ``"sylvester-shared"``).
        hidden_dims: hidden widths of the flow's networks (the factory's default when None;
            for ``"planar"`` and ``"sylvester"`` the hypernetwork's, None being a linear map for
            ``"sylvester"``; unused by ``"sylvester-shared"``).
        num_transforms: number of layers (the factory's default when None; 8 planar, 4 Sylvester).
        **options: further keyword options of the pyro_nf factory (for ``"sylvester"``:
            ``num_householder``, reflections per layer, default 8; for ``"sylvester-shared"``:
            ``count_transforms``, default ``D // 2 + 1``; for ``"ffjord"`` the solver options,
            with ``eval_trace="exact"`` unless given, so that evaluation scores the exact ``log q``).

    Returns:
        a module with ``.condition(context)`` (a ``ConditionalTransformModule``), or None.

    Example::

        >>> import torch
        >>> flow = amortized_flow("iaf", 4, 8, hidden_dims=[32], num_transforms=2)
        >>> flow.condition(torch.randn(10, 8))(torch.randn(10, 4)).shape
        torch.Size([10, 4])
    """
    if not isinstance(kind, str) or kind not in POSTERIORS:
        raise ValueError(f"kind: expected one of {POSTERIORS}, got {kind!r}")
    for name, value in (("latent_dim", latent_dim), ("context_dim", context_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if num_transforms is not None and (not isinstance(num_transforms, int) or num_transforms < 1):
        raise ValueError(f"num_transforms: expected a positive int or None, got {num_transforms!r}")
    if kind == "gaussian":
        return None
    if kind == "planar":
        if options:
            raise TypeError(f"kind='planar' takes no further options, got {sorted(options)}")
        layers = num_transforms or DEFAULT_PLANAR_LAYERS
        hidden = list(hidden_dims) if hidden_dims is not None else None
        return ConditionalComposeTransformModule(
            [conditional_planar(latent_dim, context_dim, hidden) for _ in range(layers)], cache_size=1
        )
    if kind == "sylvester":
        householder = options.pop("num_householder", None)
        if options:
            raise TypeError(f"kind='sylvester' takes only num_householder, got {sorted(options)}")
        layers = num_transforms or DEFAULT_SYLVESTER_LAYERS
        return conditional_sylvester(latent_dim, context_dim, hidden_dims, layers, householder)
    if kind == "sylvester-shared":
        count = options.pop("count_transforms", latent_dim // 2 + 1)
        if options:
            raise TypeError(f"kind='sylvester-shared' takes only count_transforms, got {sorted(options)}")
        layers = num_transforms or DEFAULT_SYLVESTER_LAYERS
        return ConditionalComposeTransformModule(
            [ExactSylvester(latent_dim, count_transforms=count) for _ in range(layers)], cache_size=1
        )
    if kind == "ffjord":
        # a posterior's log-density is scored (ELBO, IWAE): the exact trace in evaluation mode, at any D
        options.setdefault("eval_trace", "exact")
    if hidden_dims is not None:
        options["hidden_dims"] = list(hidden_dims)
    if num_transforms is not None:
        options["num_transforms"] = num_transforms
    return flow_factory(kind, conditional=True)(latent_dim, context_dim, **options)


def amortized_posterior(
    loc: Tensor,
    scale: Tensor,
    flow: ConditionalTransform | Transform | None = None,
    context: Tensor | None = None,
) -> dist.TorchDistribution:
    """``TransformedDistribution(Normal(loc, scale).to_event(1), [flow.condition(context)])`` for ``pyro.sample``.

    Args:
        loc: base locations, shape ``batch_shape + (D,)``.
        scale: positive base scales, the same shape.
        flow: a conditional flow (conditioned on ``context``), a plain transform
            (used as it is) or None (the Gaussian posterior).
        context: the encoder's context, ``batch_shape + (context_dim,)``; needed by a conditional flow.

    Returns:
        a distribution with batch shape ``batch_shape`` and event shape ``(D,)``.

    Example::

        >>> import torch
        >>> from pyro_nf.transforms import conditional_iaf
        >>> flow = conditional_iaf(2, 5, hidden_dims=[16], num_transforms=2)
        >>> q = amortized_posterior(torch.zeros(3, 2), torch.ones(3, 2), flow, torch.randn(3, 5))
        >>> z = q.rsample()
        >>> q.batch_shape, q.event_shape, q.log_prob(z).shape
        (torch.Size([3]), torch.Size([2]), torch.Size([3]))
    """
    check_tensor(loc, name="loc")
    check_tensor(scale, name="scale", like=loc)
    if loc.dim() < 1 or scale.shape != loc.shape:
        raise ValueError(
            f"loc and scale: expected two tensors of one shape (..., D), "
            f"got {tuple(loc.shape)} and {tuple(scale.shape)}"
        )
    base = dist.Normal(loc, scale).to_event(1)
    if flow is None:
        return base
    if isinstance(flow, ConditionalTransform):
        if context is None:
            raise ValueError("context: expected the encoder's context tensor for a conditional flow, got None")
        check_tensor(context, name="context", like=loc)
        if context.shape[:-1] != loc.shape[:-1]:
            raise ValueError(
                f"context: expected batch shape {tuple(loc.shape[:-1])} (that of loc), got shape {tuple(context.shape)}"
            )
        transform = flow.condition(context)
    elif isinstance(flow, Transform):
        transform = flow
    else:
        raise TypeError(f"flow: expected a ConditionalTransform, a Transform or None, got {type(flow).__name__}")
    return dist.TransformedDistribution(base, [transform])


class AmortizedFlowPosterior(nn.Module):
    """The flow half of an amortized posterior ``q(z | x)``: call it with the encoder's outputs.

    ``posterior(loc, scale, context)`` returns :func:`amortized_posterior` with
    the flow built by :func:`amortized_flow`. Register it in the guide with
    ``pyro.module``.

    Args:
        kind: see :func:`amortized_flow`.
        latent_dim: the latent size D.
        context_dim: the size of the encoder's context vector.
        hidden_dims, num_transforms, options: see :func:`amortized_flow`.

    Example::

        >>> import torch
        >>> posterior = AmortizedFlowPosterior("realnvp", 2, 6, hidden_dims=[16], num_transforms=2)
        >>> q = posterior(torch.zeros(4, 2), torch.ones(4, 2), torch.randn(4, 6))
        >>> q.rsample((10,)).shape
        torch.Size([10, 4, 2])
    """

    def __init__(
        self,
        kind: PosteriorName,
        latent_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] | None = None,
        num_transforms: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.latent_dim = latent_dim
        self.context_dim = context_dim
        self.flow = amortized_flow(kind, latent_dim, context_dim, hidden_dims, num_transforms, **options)

    def forward(self, loc: Tensor, scale: Tensor, context: Tensor | None = None) -> dist.TorchDistribution:
        """The posterior distribution given the encoder's ``loc``, ``scale`` and ``context``."""
        if loc.dim() < 1 or loc.shape[-1] != self.latent_dim:
            raise ValueError(f"loc: expected shape (..., {self.latent_dim}), got {tuple(loc.shape)}")
        if self.flow is None:
            return amortized_posterior(loc, scale)
        return amortized_posterior(loc, scale, cast(ConditionalTransform, self.flow), context)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, latent_dim={self.latent_dim}, context_dim={self.context_dim}"
