"""Energy targets U1-U4 against Rezende & Mohamed (2015) Table 1, evaluated independently in numpy."""

import math

import numpy as np
import pytest
import torch

from node_engine.datasets.energy import ENERGIES

POINTS = np.array([[0.0, 0.0], [2.0, 0.0], [-1.3, 0.7], [1.0, -2.5], [0.4, 3.1], [-2.2, -1.9]])


def _w1(z):
    return np.sin(2 * np.pi * z[:, 0] / 4)


def _w2(z):
    return 3 * np.exp(-0.5 * ((z[:, 0] - 1) / 0.6) ** 2)


def _w3(z):
    return 3 / (1 + np.exp(-(z[:, 0] - 1) / 0.3))


REFERENCE = {
    "u1": lambda z: 0.5 * ((np.linalg.norm(z, axis=1) - 2) / 0.4) ** 2
    - np.log(np.exp(-0.5 * ((z[:, 0] - 2) / 0.6) ** 2) + np.exp(-0.5 * ((z[:, 0] + 2) / 0.6) ** 2)),
    "u2": lambda z: 0.5 * ((z[:, 1] - _w1(z)) / 0.4) ** 2,
    "u3": lambda z: -np.log(
        np.exp(-0.5 * ((z[:, 1] - _w1(z)) / 0.35) ** 2) + np.exp(-0.5 * ((z[:, 1] - _w1(z) + _w2(z)) / 0.35) ** 2)
    ),
    "u4": lambda z: -np.log(
        np.exp(-0.5 * ((z[:, 1] - _w1(z)) / 0.4) ** 2) + np.exp(-0.5 * ((z[:, 1] - _w1(z) + _w3(z)) / 0.35) ** 2)
    ),
}


@pytest.mark.parametrize("name", ["u1", "u2", "u3", "u4"])
def test_energy_matches_table_1(name):
    got = ENERGIES[name](torch.tensor(POINTS, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, REFERENCE[name](POINTS), rtol=1e-12, atol=1e-12)


def test_hand_computed_values():
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    # U2 vanishes on the ridge z2 = sin(π z1 / 2): (0, 0) and (1, 1).
    assert ENERGIES["u2"](z[:2]).abs().max().item() < 1e-15
    # U1 at (2, 0): ring term 0, -ln(1 + e^{-½(4/0.6)²}).
    assert ENERGIES["u1"](z[2:]).item() == pytest.approx(-math.log1p(math.exp(-0.5 * (4 / 0.6) ** 2)), abs=1e-15)
    # U1 at the origin: ½(2/0.4)² - ln(2 e^{-½(2/0.6)²}).
    expected = 0.5 * 25 - math.log(2) + 0.5 * (2 / 0.6) ** 2
    assert ENERGIES["u1"](z[:1]).item() == pytest.approx(expected, rel=1e-14)


def test_energy_far_from_modes_is_finite():
    z = torch.tensor([[40.0, -60.0]], dtype=torch.float64)
    for fn in ENERGIES.values():
        assert torch.isfinite(fn(z)).all()


def test_energy_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        ENERGIES["u1"](torch.zeros(3, 3))
