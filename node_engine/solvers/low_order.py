"""Low-order Runge–Kutta methods under torchdiffeq's names: heun2, heun3 (fixed grid),
adaptive_heun and fehlberg2 (adaptive).

- heun2: Heun's method (explicit trapezoid), order 2 (Heun 1900; HNW I §II.1, Table 1.1).
- heun3: Heun's third-order method (Heun 1900; HNW I §II.1, Table 1.1, right), order 3.
- adaptive_heun: Heun–Euler 2(1): Heun's weights propagated, forward Euler as the embedded
  first-order solution (as torchdiffeq's ``adaptive_heun``).
- fehlberg2: Runge–Kutta–Fehlberg 1(2) (Fehlberg, NASA TR R-315, 1969, Table III), with the
  second-order weights propagated (local extrapolation, as torchdiffeq's ``fehlberg2``).

Neither adaptive pair is FSAL; their dense output is the cubic Hermite interpolant through
(y0, f0, y1, f1), f1 one extra stage evaluated only in steps with outputs inside (order 2 here,
the order of y1).
"""

from .tableau import ButcherTableau, hermite_dense

HEUN2 = ButcherTableau(
    name="heun2", c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2,
    reference="Heun 1900; HNW I §II.1, Table 1.1",
)

HEUN3 = ButcherTableau(
    name="heun3", c=(0.0, 1 / 3, 2 / 3), a=((), (1 / 3,), (0.0, 2 / 3)), b=(0.25, 0.0, 0.75), order=3,
    reference="Heun 1900; HNW I §II.1, Table 1.1 (right)",
)

_HEUN_B = (0.5, 0.5)
ADAPTIVE_HEUN = ButcherTableau(
    name="adaptive_heun", c=(0.0, 1.0), a=((), (1.0,)), b=_HEUN_B, order=2,
    b_err=(0.5 - 1.0, 0.5 - 0.0), error_order=1,
    extra_c=(1.0,), extra_a=(_HEUN_B,),
    dense=hermite_dense(_HEUN_B + (0.0,), 3), dense_order=2,
    reference="Heun 1900 with an embedded Euler step (Heun–Euler 2(1)); torchdiffeq adaptive_heun",
)

_FE_B = (1 / 512, 255 / 256, 1 / 512)
_FE_BHAT = (1 / 256, 255 / 256, 0.0)
FEHLBERG2 = ButcherTableau(
    name="fehlberg2", c=(0.0, 0.5, 1.0), a=((), (0.5,), (1 / 256, 255 / 256)), b=_FE_B, order=2,
    b_err=tuple(x - y for x, y in zip(_FE_B, _FE_BHAT)), error_order=1,
    extra_c=(1.0,), extra_a=(_FE_B,),
    dense=hermite_dense(_FE_B + (0.0,), 4), dense_order=2,
    reference="Fehlberg, NASA TR R-315 (1969), RKF1(2), Table III",
)
