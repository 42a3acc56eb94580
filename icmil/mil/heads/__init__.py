"""The registered MIL heads; importing this package registers all of them."""

from icmil.mil.heads.abmil import ABMIL
from icmil.mil.heads.dtfd import DTFDMIL
from icmil.mil.heads.maxpool import MaxPoolMIL
from icmil.mil.heads.transmil import TransMIL

__all__ = ["ABMIL", "DTFDMIL", "MaxPoolMIL", "TransMIL"]
