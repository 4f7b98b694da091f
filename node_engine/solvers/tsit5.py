"""Tsitouras 5(4) with FSAL and its own 4th-order continuous extension.

Reference: Ch. Tsitouras, "Runge–Kutta pairs of order 5(4) satisfying only the first column
simplifying assumption", Comput. Math. Appl. 62(2):770–775, 2011 (Table 1 for the pair, and the
interpolant b_i(θ) given in the paper, factored form).
"""

import numpy as np

from .tableau import ButcherTableau, VPoly

_B = (
    0.09646076681806523,
    0.01,
    0.4798896504144996,
    1.379008574103742,
    -3.290069515436081,
    2.324710524099774,
    0.0,
)
# b - b̂ (Tsitouras' error weights)
_BERR = (
    -0.00178001105222577714,
    -0.0008164344596567469,
    0.007880878010261995,
    -0.1447110071732629,
    0.5823571654525552,
    -0.45808210592918697,
    1 / 66,
)


def _dense():
    P = np.polynomial.polynomial
    t = [0.0, 1.0]
    polys = [
        -1.0530884977290216
        * P.polymul(P.polymul(t, [-1.3299890189751412, 1.0]), [0.7139816917074209, -1.4364028541716351, 1.0]),
        0.1017 * P.polymul(P.polymul(t, t), [1.2949852507374631, -2.1966568338249754, 1.0]),
        2.490627285651252793
        * P.polymul(P.polymul(t, t), [1.57803468208092486, -2.38535645472061657, 1.0]),
        -16.54810288924490272
        * P.polymul(P.polymul([-1.21712927295533244, 1.0], [-0.61620406037800089, 1.0]), P.polymul(t, t)),
        47.37952196281928122
        * P.polymul(P.polymul([-1.203071208372362603, 1.0], [-0.658047292653547382, 1.0]), P.polymul(t, t)),
        -34.87065786149660974 * P.polymul(P.polymul([-1.2, 1.0], [-0.666666666666666667, 1.0]), P.polymul(t, t)),
        2.5 * P.polymul(P.polymul([-1.0, 1.0], [-0.6, 1.0]), P.polymul(t, t)),
    ]
    coef = np.zeros((5, 7))
    for j, p in enumerate(polys):
        coef[: len(p), j] = p
    return VPoly(coef).as_dense()


TSIT5 = ButcherTableau(
    name="tsit5",
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    a=(
        (),
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.897153057105493, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.028269050394068383),
        _B[:6],
    ),
    b=_B,
    order=5,
    b_err=_BERR,
    error_order=4,
    dense=_dense(),
    dense_order=4,
    check_tol=1e-11,
    reference="Tsitouras, Comput. Math. Appl. 62(2):770-775, 2011",
)
