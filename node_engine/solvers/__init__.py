"""Runge–Kutta methods, step-size control and the integration loops of node_engine.

``METHODS`` maps each ``method=`` name to its validated tableau; ``ADAPTIVE`` / ``FIXED`` split them.
"""

from .bosh3 import BOSH3
from .dopri5 import DOPRI5
from .dopri8 import DOPRI8
from .fixed import EULER, MIDPOINT, RK4
from .tableau import ButcherTableau
from .tsit5 import TSIT5

ADAPTIVE = {"bosh3": BOSH3, "dopri5": DOPRI5, "tsit5": TSIT5, "dopri8": DOPRI8}
FIXED = {"euler": EULER, "midpoint": MIDPOINT, "rk4": RK4}
METHODS: dict[str, ButcherTableau] = {**FIXED, **ADAPTIVE}

# Default PI coefficient β: 0 (the I controller of scipy/torchdiffeq, which keeps NFE comparable);
# options=dict(beta=0.04) gives Hairer's dopri5.f PI controller (fewer rejections on hard problems).
DEFAULT_BETA = {"bosh3": 0.0, "dopri5": 0.0, "tsit5": 0.0, "dopri8": 0.0}

__all__ = ["ADAPTIVE", "FIXED", "METHODS", "DEFAULT_BETA", "ButcherTableau"]
