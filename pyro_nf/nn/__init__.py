"""Networks used by the flows: the MADE and the coupling networks."""

from pyro_nf.nn.made import MADE, MaskedLinear
from pyro_nf.nn.nets import MLP
from pyro_nf.nn.odefunc import ConcatSquashConv2d, ConcatSquashLinear, ConvODENet, ODENet

__all__ = ["MADE", "MLP", "MaskedLinear", "ConcatSquashLinear", "ODENet", "ConcatSquashConv2d", "ConvODENet"]
