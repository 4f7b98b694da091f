"""Runge–Kutta methods, step-size control and the integration loops of node_engine.

``METHODS`` maps each ``method=`` name to its validated tableau. ``ADAPTIVE`` / ``FIXED`` are
derived from the data: a tableau with error weights (``ButcherTableau.adaptive``) is adaptive, and
every adaptive method runs in both step-control modes (joint and per-sample); a new method is one
tableau added to ``_TABLEAUS``.
"""

from .bosh3 import BOSH3
from .dopri5 import DOPRI5
from .dopri8 import DOPRI8
from .fixed import EULER, MIDPOINT, RK4
from .low_order import ADAPTIVE_HEUN, FEHLBERG2, HEUN2, HEUN3
from .esdirk import STIFF, ESDIRKTableau
from .implicit import IMPLICIT_TABLEAUS, ImplicitTableau
from .tableau import ButcherTableau
from .tsit5 import TSIT5

_TABLEAUS = (EULER, MIDPOINT, HEUN2, HEUN3, RK4, ADAPTIVE_HEUN, FEHLBERG2, BOSH3, DOPRI5, TSIT5, DOPRI8)
METHODS: dict[str, ButcherTableau] = {tab.name: tab for tab in _TABLEAUS}
ADAPTIVE = {name: tab for name, tab in METHODS.items() if tab.adaptive}
# implicit fixed-grid methods (Newton on a dense Jacobian: small states): usable from odeint and
# odeint_adjoint, not listed in METHODS (the job-spec choices), see docs/torchdiffeq.md
IMPLICIT: dict[str, ImplicitTableau] = {tab.name: tab for tab in IMPLICIT_TABLEAUS}
# adaptive stiff methods (ESDIRK, Newton on a dense Jacobian: small states; joint and per-sample
# stepping, odeint and odeint_adjoint), see solvers/esdirk.py; not in METHODS (not RK tableaus), job
# specs list them beside it (node_engine.specs), see docs/torchdiffeq.md
FIXED = {name: tab for name, tab in METHODS.items() if not tab.adaptive}

__all__ = ["ADAPTIVE", "FIXED", "IMPLICIT", "METHODS", "STIFF", "ButcherTableau", "ESDIRKTableau", "ImplicitTableau"]
