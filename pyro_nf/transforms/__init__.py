"""pyro_nf transforms: classes and their lowercase factories, one module per family.

- :mod:`~pyro_nf.transforms.elementwise`: the element-wise maps (affine, additive) the
  coupling and autoregressive skeletons plug in;
- :mod:`~pyro_nf.transforms.autoregressive`: the autoregressive skeleton, MAF and IAF;
- :mod:`~pyro_nf.transforms.coupling`: the coupling skeleton and RealNVP for vectors;
- :mod:`~pyro_nf.transforms.rational_quadratic` and :mod:`~pyro_nf.transforms.spline`: the
  rational-quadratic spline and the neural spline flows built on both skeletons;
- :mod:`~pyro_nf.transforms.image_coupling`: channel and checkerboard couplings over images;
- :mod:`~pyro_nf.transforms.multiscale`: squeeze, factor-out, the multiscale builder, multiscale RealNVP;
- :mod:`~pyro_nf.transforms.glow`: the invertible 1x1 convolution, Glow and class-conditional Glow;
- :mod:`~pyro_nf.transforms.normalization`: batch normalization (vectors) and ActNorm (images);
- :mod:`~pyro_nf.transforms.conditional_prior`: a class-conditional prior for any flow;
- :mod:`~pyro_nf.transforms.continuous` and :mod:`~pyro_nf.transforms.ode`: FFJORD and its solves;
  :mod:`~pyro_nf.transforms.continuous_multiscale`: the multiscale image CNF;
- :mod:`~pyro_nf.transforms.flow_matching`: training FFJORD's fields by flow matching;
- :mod:`~pyro_nf.transforms.sylvester`: Householder Sylvester flows;
- :mod:`~pyro_nf.transforms.preprocess`: dequantization and the logit transform.
"""

from pyro_nf.conditional import ConditionalFlowStack
from pyro_nf.core import FlowStack, FlowTransform, FlowTransformModule, InverseTransformModule
from pyro_nf.transforms.autoregressive import (
    AffineAutoregressive,
    Autoregressive,
    ConditionalAffineAutoregressive,
    ConditionalAutoregressive,
    ConditionedAffineAutoregressive,
    ConditionedAutoregressive,
    affine_autoregressive,
    conditional_iaf,
    conditional_maf,
    iaf,
    maf,
)
from pyro_nf.transforms.conditional_prior import (
    ConditionalLatentAffine,
    ConditionedLatentAffine,
    conditional_latent_affine,
)
from pyro_nf.transforms.continuous import (
    FFJORD,
    ConditionalFFJORD,
    ConditionedFFJORD,
    conditional_ffjord,
    ffjord,
)
from pyro_nf.transforms.continuous_multiscale import ffjord_multiscale
from pyro_nf.transforms.coupling import (
    AffineCoupling,
    ConditionalAffineCoupling,
    ConditionalCoupling,
    ConditionedAffineCoupling,
    ConditionedCoupling,
    Coupling,
    affine_coupling,
    conditional_realnvp,
    coupling_mask,
    realnvp,
)
from pyro_nf.transforms.elementwise import AdditiveMap, AffineMap, ElementwiseMap
from pyro_nf.transforms.flow_matching import BlockSegment, block_segments, flow_matching_loss, ot_pairing
from pyro_nf.transforms.glow import GlowStep, InvertibleConv1x1, conditional_glow, glow, glow_step, invertible_conv1x1
from pyro_nf.transforms.image_coupling import ImageCoupling, image_coupling, prior_coupling
from pyro_nf.transforms.multiscale import FactorOut, Squeeze, factor_out, realnvp_multiscale, squeeze
from pyro_nf.transforms.normalization import ActNorm, BatchNorm, actnorm, batch_norm
from pyro_nf.transforms.ode import ODEOptions
from pyro_nf.transforms.preprocess import Logit, dequantize, logit, reduce_bits
from pyro_nf.transforms.rational_quadratic import RationalQuadraticSpline
from pyro_nf.transforms.spline import (
    ConditionalSplineAutoregressive,
    ConditionalSplineCoupling,
    SplineAutoregressive,
    SplineCoupling,
    conditional_nsf,
    nsf,
    spline_autoregressive,
    spline_coupling,
)
from pyro_nf.transforms.sylvester import (
    ConditionalSylvester,
    ConditionedSylvester,
    ExactSylvester,
    HouseholderSylvester,
    conditional_sylvester,
    exact_sylvester,
    sylvester,
)

__all__ = [
    "FFJORD",
    "ActNorm",
    "AdditiveMap",
    "AffineAutoregressive",
    "AffineCoupling",
    "AffineMap",
    "Autoregressive",
    "BatchNorm",
    "BlockSegment",
    "ConditionalAffineAutoregressive",
    "ConditionalAffineCoupling",
    "ConditionalAutoregressive",
    "ConditionalCoupling",
    "ConditionalFFJORD",
    "ConditionalFlowStack",
    "ConditionalLatentAffine",
    "ConditionalSplineAutoregressive",
    "ConditionalSplineCoupling",
    "ConditionalSylvester",
    "ConditionedAffineAutoregressive",
    "ConditionedAffineCoupling",
    "ConditionedAutoregressive",
    "ConditionedCoupling",
    "ConditionedFFJORD",
    "ConditionedLatentAffine",
    "ConditionedSylvester",
    "Coupling",
    "ElementwiseMap",
    "ExactSylvester",
    "FactorOut",
    "FlowStack",
    "FlowTransform",
    "FlowTransformModule",
    "GlowStep",
    "HouseholderSylvester",
    "ImageCoupling",
    "InverseTransformModule",
    "InvertibleConv1x1",
    "Logit",
    "ODEOptions",
    "RationalQuadraticSpline",
    "SplineAutoregressive",
    "SplineCoupling",
    "Squeeze",
    "actnorm",
    "affine_autoregressive",
    "affine_coupling",
    "batch_norm",
    "block_segments",
    "conditional_ffjord",
    "conditional_glow",
    "conditional_iaf",
    "conditional_latent_affine",
    "conditional_maf",
    "conditional_nsf",
    "conditional_realnvp",
    "conditional_sylvester",
    "coupling_mask",
    "dequantize",
    "exact_sylvester",
    "factor_out",
    "ffjord",
    "ffjord_multiscale",
    "flow_matching_loss",
    "glow",
    "glow_step",
    "iaf",
    "image_coupling",
    "invertible_conv1x1",
    "logit",
    "maf",
    "nsf",
    "ot_pairing",
    "prior_coupling",
    "realnvp",
    "realnvp_multiscale",
    "reduce_bits",
    "spline_autoregressive",
    "spline_coupling",
    "squeeze",
    "sylvester",
]
