"""Dormand–Prince 5(4) (DOPRI5) with FSAL and Shampine's 4th-order dense output.

References: J. R. Dormand, P. J. Prince, "A family of embedded Runge–Kutta formulae", J. Comput.
Appl. Math. 6(1):19–26, 1980 (tableau); dense output coefficients d_i from L. F. Shampine,
"Some practical Runge–Kutta formulas", Math. Comp. 46:135–150, 1986, in the nested form of
Hairer's dopri5.f (CONTD5; Hairer–Nørsett–Wanner, Solving ODEs I, §II.6, eq. (6.12)).
"""

from .tableau import ButcherTableau, hairer_dense

_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_BHAT = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_D = (
    -12715105075 / 11282082432,
    0.0,
    87487479700 / 32700410799,
    -10690763975 / 1880347072,
    701980252875 / 199316789632,
    -1453857185 / 822651844,
    69997945 / 29380423,
)

DOPRI5 = ButcherTableau(
    name="dopri5",
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    b=_B,
    order=5,
    b_err=tuple(x - y for x, y in zip(_B, _BHAT)),
    error_order=4,
    dense=hairer_dense(_B, [_D], 7, 7),
    dense_order=4,
    reference="Dormand & Prince, JCAM 6(1):19-26, 1980; dense output Shampine 1986 / Hairer dopri5.f",
)
