"""Backprop through the implicit fixed-grid methods (issue 16): the converged stages are differentiated
by the implicit function theorem with each stage's own Jacobian, so the gradient is the discrete
solve's on a nonlinear field (the step-start Jacobian was 1–30% off here). Right values: central
finite differences of the discrete solve, and the analytic solution's gradient for the high-order
methods."""

import pytest
import torch

from node_engine import odeint
from node_engine.solvers import IMPLICIT

f64 = torch.float64
K, Y0, T, H = 2.0, 1.0, 2.0, 0.25  # y' = −k y², y = y0 / (1 + k y0 t); h·k·y0 = 0.5: J changes a lot per step


def _y_end(k, y0, method):
    return odeint(lambda t, y: -k * y**2, y0, torch.tensor([0.0, T], dtype=f64), method=method,
                  options=dict(step_size=H))[-1, 0]


@pytest.mark.parametrize("method", sorted(IMPLICIT))
def test_gradient_is_the_discrete_solves(method):
    k = torch.tensor(K, dtype=f64, requires_grad=True)
    y0 = torch.tensor([Y0], dtype=f64, requires_grad=True)
    y = _y_end(k, y0, method)
    y.backward()
    eps = 1e-6
    with torch.no_grad():
        assert float(_y_end(torch.tensor(K, dtype=f64), torch.tensor([Y0], dtype=f64), method)) == float(y)
        fd_k = (_y_end(K + eps, torch.tensor([Y0], dtype=f64), method) - _y_end(K - eps, torch.tensor([Y0], dtype=f64),
                                                                                 method)) / (2 * eps)
        fd_y = (_y_end(K, torch.tensor([Y0 + eps], dtype=f64), method) - _y_end(K, torch.tensor([Y0 - eps], dtype=f64),
                                                                                method)) / (2 * eps)
    assert float(k.grad) == pytest.approx(float(fd_k), rel=1e-7)
    assert float(y0.grad) == pytest.approx(float(fd_y), rel=1e-7)


@pytest.mark.parametrize("method", ["radauIIA5", "gl6"])
def test_high_order_gradient_matches_the_analytic_one(method):
    # dy(T)/dy0 = 1/(1 + k y0 T)², dy(T)/dk = −y0² T/(1 + k y0 T)²
    k = torch.tensor(K, dtype=f64, requires_grad=True)
    y0 = torch.tensor([Y0], dtype=f64, requires_grad=True)
    _y_end(k, y0, method).backward()
    d = (1 + K * Y0 * T) ** 2
    assert float(y0.grad) == pytest.approx(1 / d, rel=1e-5)
    assert float(k.grad) == pytest.approx(-Y0**2 * T / d, rel=1e-5)
