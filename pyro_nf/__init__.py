"""pyro_nf: normalizing flows for Pyro (RealNVP, Glow, MAF/IAF, FFJORD) as TransformModules."""

from pyro_nf.checks import set_validation, validation, validation_enabled
from pyro_nf.distributions import ConditionalFlowModel, ConditionedFlowModel, FlowModel

__version__ = "0.1.0"

__all__ = [
    "ConditionalFlowModel",
    "ConditionedFlowModel",
    "FlowModel",
    "__version__",
    "set_validation",
    "validation",
    "validation_enabled",
]
