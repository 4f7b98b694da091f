"""Tableaus: self-validation catches typos; every method shows its classical order when stepped
with a fixed step (the adaptive tableaus too), and so does its dense output."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from node_engine.solvers import ADAPTIVE, METHODS
from node_engine.solvers.adaptive import SolveInfo
from node_engine.solvers.fixed_grid import integrate_fixed
from node_engine.solvers.rk import RKStepper
from node_engine.solvers.state import StateLayout, VectorField

from .problems import ALL_METHODS, ORDER, PROBLEMS, ADAPTIVE_METHODS, LOW_ORDER_ADAPTIVE

RATIONAL = next(p for p in PROBLEMS if p.name == "rational")
COS = next(p for p in PROBLEMS if p.name == "cos")
# step counts (n, 2n) in the asymptotic range and above round-off, per method
STEPS = {"euler": 128, "midpoint": 64, "rk4": 16, "bosh3": 32, "dopri5": 64, "tsit5": 64, "dopri8": 8,
         "heun2": 64, "heun3": 32, "adaptive_heun": 64, "fehlberg2": 64}
STEPS_COS = {"euler": 128, "midpoint": 64, "rk4": 32, "bosh3": 32, "dopri5": 32, "tsit5": 32, "dopri8": 8,
             "heun2": 64, "heun3": 32, "adaptive_heun": 64, "fehlberg2": 64}


def _fixed(method, prob, n, theta=None):
    tab = METHODS[method]
    y0 = prob.y0
    vf = VectorField(prob.f, StateLayout(y0), torch.float64)
    stepper = RKStepper(tab, y0.shape, "cpu", torch.float64, reuse_buffer=True)
    grid = np.linspace(0.0, prob.t1, n + 1)
    if theta is None:
        out = integrate_fixed(vf, y0.clone(), [0.0, prob.t1], stepper, list(grid), SolveInfo())
        return float((out[-1] - torch.from_numpy(prob.exact(np.array([prob.t1]))[0])).abs().max())
    # dense output at t_n + θ h inside every step, max error against the exact solution
    z, worst = y0.clone(), 0.0
    for t, t_new in zip(grid[:-1], grid[1:]):
        k1 = vf(float(t), z.view(y0.shape))
        z_new = stepper.step(vf, float(t), float(t_new), float(t_new), z, k1)
        ym = stepper.dense(vf, float(t), float(t_new), z, [theta])[0]
        exact = prob.exact(np.array([t + theta * (t_new - t)]))[0]
        worst = max(worst, float((ym - torch.from_numpy(exact)).abs().max()))
        z = z_new.clone()
    return worst


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("prob", [RATIONAL, COS], ids=["rational", "cos"])
def test_convergence_order(method, prob):
    n = STEPS[method] if prob is RATIONAL else STEPS_COS[method]
    e1, e2 = _fixed(method, prob, n), _fixed(method, prob, 2 * n)
    observed = math.log2(e1 / e2)
    p = ORDER[method]
    # a typo lowers the order; linear problems may show a higher one (fewer conditions apply)
    upper = p + 0.5 if prob is RATIONAL else p + 2.5
    assert p - 0.35 <= observed <= upper, (e1, e2, observed)


@pytest.mark.parametrize("method", ADAPTIVE_METHODS + LOW_ORDER_ADAPTIVE)
def test_dense_output_order(method):
    # global error at interior points converges with the method's order (dense order + 1 >= order)
    n = STEPS[method]
    e1, e2 = _fixed(method, RATIONAL, n, theta=0.37), _fixed(method, RATIONAL, 2 * n, theta=0.37)
    assert math.log2(e1 / e2) >= ORDER[method] - 0.45, (e1, e2)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_tableau_typo_is_caught(method):
    tab = METHODS[method]
    if tab.stages > 1:
        i = tab.stages - 1
        row = list(tab.a[i])
        row[0] += 1e-3
        bad_a = tab.a[:i] + (tuple(row),) + tab.a[i + 1 :]
        with pytest.raises(ValueError):
            dataclasses.replace(tab, a=bad_a, c=tab.c[:i] + (tab.c[i] + 1e-3,) + tab.c[i + 1 :])
    b = list(tab.b)
    b[0] += 1e-4
    b[-1] -= 1e-4  # keeps Σb = 1: only a higher order condition can see it
    if tab.order > 1:
        with pytest.raises(ValueError, match="order"):
            dataclasses.replace(tab, b=tuple(b))


def test_dense_typo_is_caught():
    tab = ADAPTIVE["dopri5"]
    dense = [list(r) for r in tab.dense]
    dense[2][1] += 1e-3
    with pytest.raises(ValueError, match="dense"):
        dataclasses.replace(tab, dense=tuple(tuple(r) for r in dense))


def test_fsal_and_tensor_form():
    assert all(ADAPTIVE[m].fsal for m in ("bosh3", "dopri5", "tsit5", "dopri8"))
    assert not ADAPTIVE["adaptive_heun"].fsal and not ADAPTIVE["fehlberg2"].fsal  # extra stage for dense output
    assert not METHODS["rk4"].fsal
    tt = METHODS["dopri5"].to("cpu", torch.float32)
    assert tt.b.dtype == torch.float32 and tt.b.shape == (7,)
    assert float(tt.b_err.sum()) == pytest.approx(0.0, abs=1e-7)
