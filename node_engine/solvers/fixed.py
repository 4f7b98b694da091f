"""Fixed-step explicit Runge–Kutta tableaus: euler, midpoint, rk4.

- euler: forward Euler, order 1 (Euler 1768).
- midpoint: explicit midpoint rule, order 2 (Runge 1895; Hairer–Nørsett–Wanner, Solving ODEs I, §II.1).
- rk4: the classical fourth-order method (Kutta 1901; HNW I, Table 1.2 left).
"""

from .tableau import ButcherTableau

EULER = ButcherTableau(
    name="euler", c=(0.0,), a=((),), b=(1.0,), order=1, reference="Euler 1768; HNW I §II.1"
)

MIDPOINT = ButcherTableau(
    name="midpoint",
    c=(0.0, 0.5),
    a=((), (0.5,)),
    b=(0.0, 1.0),
    order=2,
    reference="Runge 1895; HNW I §II.1, eq. (1.6)",
)

RK4 = ButcherTableau(
    name="rk4",
    c=(0.0, 0.5, 0.5, 1.0),
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    order=4,
    reference="Kutta 1901; HNW I, Table 1.2 (left)",
)
