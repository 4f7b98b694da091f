"""odeint_dense (torchdiffeq's API): the interpolant at off-grid times against the closed form
expm(A t) y0 (scipy.linalg.expm), its gradient, and its named refusals."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from node_engine import odeint_dense

D = torch.float64
_A = np.array([[-0.1, 2.0], [-2.0, -0.1]])  # a decaying rotation: y(t) = expm(A t) y0
_Y0 = np.array([1.0, 0.5])


def _f(t, y):
    return torch.as_tensor(_A, dtype=y.dtype) @ y


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
def test_interpolant_matches_closed_form_at_off_grid_times(method):
    rtol, atol = 1e-8, 1e-10
    sol = odeint_dense(_f, torch.tensor(_Y0, dtype=D), 0.0, 5.0, rtol=rtol, atol=atol, method=method)
    assert sol.n_steps > 5  # the queries below fall inside steps, not only on their ends
    ts = np.array([4.9, 0.0, 0.123, 1.7, 2.2222, 3.14159, 5.0, 0.123])  # any order, repeats
    out = sol(torch.tensor(ts, dtype=D))
    ref = np.stack([scipy.linalg.expm(_A * t) @ _Y0 for t in ts])
    assert out.shape == (len(ts), 2)
    assert np.max(np.abs(out.numpy() - ref) / (atol + rtol * np.abs(ref))) < 100
    one = sol(torch.tensor(1.7, dtype=D))
    assert one.shape == (2,) and torch.equal(one, out[3])


def test_gradient_through_the_interpolant():
    y0 = torch.tensor(_Y0, dtype=D, requires_grad=True)
    sol = odeint_dense(_f, y0, 0.0, 3.0, rtol=1e-10, atol=1e-12)
    t = 1.2345
    (g,) = torch.autograd.grad(sol(t).sum(), y0)
    ref = scipy.linalg.expm(_A * t).sum(0)  # d(sum y(t))/dy0 = 1ᵀ expm(A t)
    assert np.allclose(g.numpy(), ref, rtol=1e-6, atol=1e-8)


def test_refusals():
    y0 = torch.tensor(_Y0, dtype=D)
    with pytest.raises(ValueError, match="explicit adaptive method"):
        odeint_dense(_f, y0, 0.0, 1.0, method="rk4")
    with pytest.raises(ValueError, match="explicit adaptive method"):
        odeint_dense(_f, y0, 0.0, 1.0, method="kvaerno5")
    sol = odeint_dense(_f, y0, 0.0, 1.0)
    with pytest.raises(ValueError, match="must lie in"):
        sol(torch.tensor([0.5, 1.5], dtype=D))
