"""One central list of test problems with exact (or independently computed) solutions, and of
methods, shared by every engine test. Reference values never come from node_engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.integrate
import scipy.linalg
import torch
from torch import nn

from node_engine.solvers import METHODS

# every method the engine registers: a new tableau is tested by every parametrized test at once
# (its claimed order is checked against the observed convergence in test_tableaus.py)
# The order-2(1) pairs (torchdiffeq's adaptive_heun, fehlberg2) need ~1e4-1e5 steps at the tight
# tolerances the shared accuracy tests use and miss their 100x bar (global error of a low order):
# they run in the order tests here and in test_torchdiffeq_compat.py at loose tolerances only.
LOW_ORDER_ADAPTIVE = sorted(name for name, tab in METHODS.items() if tab.adaptive and tab.order <= 2)
ADAPTIVE_METHODS = sorted(name for name, tab in METHODS.items() if tab.adaptive and tab.order > 2)
FIXED_METHODS = sorted(name for name, tab in METHODS.items() if not tab.adaptive)
ALL_METHODS = FIXED_METHODS + ADAPTIVE_METHODS + LOW_ORDER_ADAPTIVE
ORDER = {name: tab.order for name, tab in METHODS.items()}
STEP_CONTROLS = ["joint", "per_sample"]


@dataclass
class Problem:
    """dy/dt = f(t, y), y(t0) = y0 with ``exact(t) -> (len(t), *y0.shape)`` (float64)."""

    name: str
    f: Callable
    y0: torch.Tensor
    exact: Callable[[np.ndarray], np.ndarray]
    t1: float = 1.0


A_LINEAR = torch.tensor([[-0.1, 2.0, 0.0], [-2.0, -0.1, 0.3], [0.0, -0.3, -0.5]], dtype=torch.float64)


def _linear_exact(t):
    y0 = np.array([1.0, 0.5, -0.3])
    return np.stack([scipy.linalg.expm(A_LINEAR.numpy() * ti) @ y0 for ti in t])


PROBLEMS = [
    # y' = y: the textbook case (torchdiffeq's bosh3/dopri8 miss it at rtol=1e-9)
    Problem("exponential", lambda t, y: y, torch.tensor([1.0], dtype=torch.float64),
            lambda t: np.exp(t)[:, None]),
    # linear system with rotation and decay: y(t) = expm(A t) y0
    Problem("linear", lambda t, y: A_LINEAR @ y, torch.tensor([1.0, 0.5, -0.3], dtype=torch.float64),
            _linear_exact, t1=3.0),
    # nonlinear and non-autonomous: y' = -2 t y², y = 1/(1 + t²)
    Problem("rational", lambda t, y: -2 * t * y**2, torch.tensor([1.0], dtype=torch.float64),
            lambda t: (1 / (1 + t**2))[:, None], t1=2.0),
    # non-autonomous linear: y' = cos(t) y, y = exp(sin t)
    Problem("cos", lambda t, y: torch.cos(t) * y, torch.tensor([1.0, 2.0], dtype=torch.float64),
            lambda t: np.exp(np.sin(t))[:, None] * np.array([1.0, 2.0]), t1=4.0),
]
PROBLEM_IDS = [p.name for p in PROBLEMS]


def per_row(f):
    """A problem's field applied to each row of a batch on its own (per-sample step control:
    t is (B,), y is (B, *S)); the reference answer of each row is then the problem's exact one."""

    def g(t, y):
        return torch.stack([f(t[b], y[b]) for b in range(y.shape[0])])

    return g


def van_der_pol(mu: float):
    def f(t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mu * (1 - x**2) * v - x], dim=-1)

    return f


def van_der_pol_reference(mu: float, y0: np.ndarray, t: np.ndarray) -> np.ndarray:
    """scipy DOP853 at rtol=atol=1e-12 (independent reference)."""

    def f(_t, y):
        return [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]]

    sol = scipy.integrate.solve_ivp(f, (t[0], t[-1]), y0, method="DOP853", t_eval=t, rtol=1e-12, atol=1e-12)
    assert sol.success
    return sol.y.T


class MLPField(nn.Module):
    """A small float64 tanh MLP field f(t, y) with t as an input; t may be one time or one per row
    of y (per-sample step control)."""

    def __init__(self, dim=2, hidden=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(dim + 1, hidden).double()
        self.l2 = nn.Linear(hidden, dim).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, t, y):
        tt = (t.reshape(-1, 1) if t.dim() else t).expand(*y.shape[:-1], 1).to(y.dtype)
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], -1))))
