"""Flows inside Pyro inference: flow guides, amortized flow posteriors, the IWAE estimate of ``log p(x)``."""

from pyro_nf.infer.amortized import AmortizedFlowPosterior, amortized_flow, amortized_posterior
from pyro_nf.infer.autoguide import AutoFlow, flow_factory
from pyro_nf.infer.iwae import IWAEEstimate, iwae_log_likelihood

__all__ = [
    "AmortizedFlowPosterior",
    "AutoFlow",
    "IWAEEstimate",
    "amortized_flow",
    "amortized_posterior",
    "flow_factory",
    "iwae_log_likelihood",
]
