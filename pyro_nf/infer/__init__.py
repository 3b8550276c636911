"""Flows inside Pyro inference: flow guides, amortized flow posteriors, the IWAE estimate of ``log p(x)``."""

from pyro_nf.infer.amortized import AmortizedFlowPosterior, amortized_flow, amortized_posterior
from pyro_nf.infer.autoguide import AutoFlow
from pyro_nf.infer.iwae import IWAEEstimate, iwae_log_likelihood
from pyro_nf.registry import flow_factory
from pyro_nf.transforms.sylvester import ConditionalSylvester, conditional_sylvester

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
