"""Networks used by the flows: the MADE and the coupling networks."""

from pyro_nf.nn.made import MADE, MaskedLinear
from pyro_nf.nn.nets import MLP

__all__ = ["MADE", "MLP", "MaskedLinear"]
