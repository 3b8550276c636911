"""pyro_nf transforms: classes and their lowercase factories, one module per family."""

from pyro_nf.core import ConditionalFlowStack, FlowStack, FlowTransform, FlowTransformModule, InverseTransformModule
from pyro_nf.transforms.autoregressive import (
    AffineAutoregressive,
    ConditionalAffineAutoregressive,
    ConditionedAffineAutoregressive,
    conditional_iaf,
    conditional_maf,
    iaf,
    maf,
)
from pyro_nf.transforms.coupling import (
    AffineCoupling,
    ConditionalAffineCoupling,
    ConditionedAffineCoupling,
    conditional_realnvp,
    coupling_mask,
    realnvp,
)
from pyro_nf.transforms.normalization import BatchNorm, batch_norm

__all__ = [
    "AffineAutoregressive",
    "AffineCoupling",
    "BatchNorm",
    "ConditionalAffineAutoregressive",
    "ConditionalAffineCoupling",
    "ConditionalFlowStack",
    "ConditionedAffineAutoregressive",
    "ConditionedAffineCoupling",
    "FlowStack",
    "FlowTransform",
    "FlowTransformModule",
    "InverseTransformModule",
    "batch_norm",
    "conditional_iaf",
    "conditional_maf",
    "conditional_realnvp",
    "coupling_mask",
    "iaf",
    "maf",
    "realnvp",
]
