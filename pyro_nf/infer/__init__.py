"""Flows inside Pyro inference: flow guides, amortized flow posteriors, the IWAE estimate of ``log p(x)``."""

from pyro_nf.infer.amortized import (
    AmortizedFlowPosterior,
    ConditionalSylvester,
    amortized_flow,
    amortized_posterior,
    conditional_sylvester,
)
from pyro_nf.infer.autoguide import AutoFlow, flow_factory
from pyro_nf.infer.iwae import IWAEEstimate, iwae_log_likelihood

__all__ = [
    "AmortizedFlowPosterior",
    "AutoFlow",
    "ConditionalSylvester",
    "IWAEEstimate",
    "amortized_flow",
    "amortized_posterior",
    "conditional_sylvester",
    "flow_factory",
    "iwae_log_likelihood",
]
