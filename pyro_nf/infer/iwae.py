"""The importance-weighted estimate of ``log p(x)`` for any Pyro model/guide pair.

With ``K`` samples ``z_k ~ q(z | x)`` of the guide (Burda et al. 2016):

.. math::

    \\log p(x) \\ge \\mathcal L_K = \\mathbb E\\Big[\\log \\frac{1}{K}\\sum_{k=1}^K
        \\frac{p(x, z_k)}{q(z_k \\mid x)}\\Big]
    = \\mathbb E\\big[\\operatorname{logsumexp}_k (\\log p(x, z_k) - \\log q(z_k \\mid x)) - \\log K\\big].

``L_1`` is the ELBO, ``L_K`` grows with ``K`` and tends to ``log p(x)``; the
single-draw estimate used here is consistent and, for ``K`` in the thousands,
how VAE papers report test ``log p(x)``.

The guide is run under a vectorised particle plate (``K`` in chunks of
``chunk_size``) and the model is replayed against it, both through
``poutine.trace``/``poutine.replay``, so any model/guide pair works. Each
site's log-density is summed over every dimension except the particle dimension
and the data plate's: the estimate is per data point when all sites sit in one
data plate (a VAE), otherwise one number for the whole data set.

Burda et al., "Importance Weighted Autoencoders", ICLR 2016.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor

__all__ = [
    "iwae_log_likelihood",
    "IWAEEstimate",
]

_PARTICLES = "_iwae_particles"


class IWAEEstimate(NamedTuple):
    """An IWAE estimate: ``per_datum`` (one value per data point, or one in all) and its ``mean``."""

    per_datum: Tensor
    mean: float


def _plate_nesting(model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict) -> int:
    nesting = 0
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    for trace in (guide_trace, model_trace):
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                nesting = max(nesting, max((-f.dim for f in site["cond_indep_stack"] if f.vectorized), default=0))
    return nesting


def _site_log_probs(trace: Trace, particle_dim: int) -> list[tuple[Tensor, dict[str, int]]]:
    """Each site's unscaled log-density and the plates (name -> dim) it sits in."""
    out = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        if site["mask"] is not None:
            log_p = log_p.masked_fill(~torch.as_tensor(site["mask"], device=log_p.device, dtype=torch.bool), 0.0)
        plates = {f.name: f.dim for f in site["cond_indep_stack"] if f.vectorized}
        if _PARTICLES not in plates:
            raise ValueError(f"site {name!r} is outside the particle plate; is it sampled inside a pyro.plate?")
        out.append((log_p, plates))
    return out


def _reduce(log_p: Tensor, plates: dict[str, int], particle_dim: int, data_plate: str | None) -> Tensor:
    """Sum ``log_p`` down to shape (K,) or (K, N): the particle dim and the data plate's dim."""
    log_p = log_p.reshape((1,) * max(0, -particle_dim - log_p.dim()) + tuple(log_p.shape))
    keep = [particle_dim] + ([plates[data_plate]] if data_plate is not None and data_plate in plates else [])
    keep_pos = [d % log_p.dim() for d in keep]
    other = [d for d in range(log_p.dim()) if d not in keep_pos]
    reduced = log_p.sum(other) if other else log_p
    return reduced


def iwae_log_likelihood(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 5000,
    chunk_size: int = 100,
    data_plate: str | None = None,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> IWAEEstimate:
    """Estimate ``log p(x)`` with ``num_samples`` importance samples from the guide.

    ``logsumexp_k (log p(x, z_k) - log q(z_k | x)) - log K`` per data point,
    with the ``K`` samples drawn in chunks of ``chunk_size`` vectorised
    particles (memory grows with ``chunk_size``, not with ``K``), without
    gradients, on whatever device the model and guide compute on.

    Args:
        model, guide: a Pyro model and guide taking ``*args, **kwargs``.
        num_samples: ``K``.
        chunk_size: particles per vectorised pass.
        data_plate: the name of the plate over data points. When None, the only
            plate that every site of the model sits in is used if there is one;
            otherwise the estimate is one number for all the data.
        max_plate_nesting: the number of plates the model nests (found by a trace when None).

    Returns:
        an :class:`IWAEEstimate`: per data point ``log p(x_i)`` estimates and their mean.

    Example (a conjugate model: ``z ~ N(0, 1)``, ``x ~ N(z, 1)``, so ``p(x) = N(x; 0, 2)``)::

        >>> import pyro.distributions as dist
        >>> x = torch.tensor([0.5, -1.0])
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):  # the prior as proposal
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> est = iwae_log_likelihood(model, guide, x, num_samples=20000, chunk_size=5000)
        >>> exact = dist.Normal(0.0, 2**0.5).log_prob(x)
        >>> bool((est.per_datum - exact).abs().max() < 0.02)
        True
    """
    for name, value in (("num_samples", num_samples), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if max_plate_nesting is None:
        max_plate_nesting = _plate_nesting(model, guide, args, kwargs)
    elif not isinstance(max_plate_nesting, int) or max_plate_nesting < 0:
        raise ValueError(f"max_plate_nesting: expected a non-negative int or None, got {max_plate_nesting!r}")
    particle_dim = -max_plate_nesting - 1

    chunks: list[Tensor] = []
    remaining = num_samples
    with torch.no_grad():
        while remaining > 0:
            k = min(chunk_size, remaining)
            remaining -= k
            with poutine.block(), pyro.plate(_PARTICLES, k, dim=particle_dim):
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
                model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
            model_sites = _site_log_probs(model_trace, particle_dim)
            guide_sites = _site_log_probs(guide_trace, particle_dim)
            plate = data_plate if data_plate is not None else _common_plate(model_sites)
            log_w: Tensor | int = 0
            for sign, sites in ((1.0, model_sites), (-1.0, guide_sites)):
                for log_p, plates in sites:
                    if data_plate is not None and data_plate not in plates:
                        raise ValueError(
                            f"data_plate: every site must sit in plate {data_plate!r}; a site sits in {sorted(plates)}"
                        )
                    log_w = log_w + sign * _reduce(log_p, plates, particle_dim, plate)
            if isinstance(log_w, int):
                raise ValueError("the model and guide have no sample sites")
            chunks.append(log_w.reshape(k, -1))
    log_weights = torch.cat(chunks, 0)
    per_datum = torch.logsumexp(log_weights, 0) - math.log(num_samples)
    if per_datum.numel() == 1:
        per_datum = per_datum.reshape(())
    return IWAEEstimate(per_datum, float(per_datum.mean()))


def _common_plate(sites: list[tuple[Tensor, dict[str, int]]]) -> str | None:
    """The one plate (besides the particles) that every site sits in, if there is exactly one."""
    common: set[str] | None = None
    for _, plates in sites:
        names = set(plates) - {_PARTICLES}
        common = names if common is None else common & names
    return next(iter(common)) if common and len(common) == 1 else None
