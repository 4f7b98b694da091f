"""Bogacki–Shampine 3(2) with FSAL and cubic Hermite dense output.

Reference: P. Bogacki, L. F. Shampine, "A 3(2) pair of Runge–Kutta formulas", Appl. Math. Lett.
2(4):321–325, 1989. The propagated solution is third order (local extrapolation); the embedded
second-order solution only estimates the error. Dense output: cubic Hermite interpolation through
(y0, f0, y1, f1) — third order, the natural continuous extension of this pair (it is what the
authors' RKSUITE and scipy's RK23 use).
"""

from .tableau import ButcherTableau, hermite_dense

_B = (2 / 9, 1 / 3, 4 / 9, 0.0)
_BHAT = (7 / 24, 1 / 4, 1 / 3, 1 / 8)

BOSH3 = ButcherTableau(
    name="bosh3",
    c=(0.0, 0.5, 0.75, 1.0),
    a=((), (0.5,), (0.0, 0.75), (2 / 9, 1 / 3, 4 / 9)),
    b=_B,
    order=3,
    b_err=tuple(x - y for x, y in zip(_B, _BHAT)),
    error_order=2,
    dense=hermite_dense(_B, 4),
    dense_order=3,
    reference="Bogacki & Shampine, Appl. Math. Lett. 2(4):321-325, 1989",
)
