"""The adaptive stiff solver (method="kvaerno5", issue 16 item 6): accuracy against closed forms and
scipy's Radau at a tight tolerance, its step counts against dopri5, gradients, named refusals.
References come from scipy.linalg.expm, scipy.integrate.solve_ivp(Radau, rtol 1e-10) or closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch

from node_engine import odeint, odeint_adjoint
from node_engine.errors import NonFiniteStateError, SolveStatus
from node_engine.solvers.esdirk import KVAERNO5, ESDIRKTableau
from node_engine.stats import SolverStats

D = torch.float64


def _rel_err(out, ref, rtol, atol):
    """max |error| / (atol + rtol |ref|): the error in units of the requested tolerance."""
    return float(np.max(np.abs(np.asarray(out) - ref) / (atol + rtol * np.abs(ref))))


# y' = A y with eigenvalues -1 and -1e4 (a stiffness ratio of 1e4)
_P = np.array([[1.0, 1.0], [1.0, -2.0]])
_A = _P @ np.diag([-1.0, -1e4]) @ np.linalg.inv(_P)


def _linear(t, y):
    return torch.as_tensor(_A, dtype=y.dtype) @ y


def _robertson(t, y):
    y1, y2, y3 = y[0], y[1], y[2]
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2])


def _rob_np(t, y):
    y1, y2, y3 = y
    return [-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2]


MU = 1000.0


def _vdp(t, y):
    return torch.stack([y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]])


def _vdp_np(t, y):
    return [y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]]


def _vdp_jac(t, y):
    return [[0.0, 1.0], [-2 * MU * y[0] * y[1] - 1, MU * (1 - y[0] ** 2)]]


def test_tableau_is_checked_by_order_conditions():
    # the published coefficients pass order 5 (b) / 4 (b̂); a perturbed one is refused at construction
    assert KVAERNO5.order == 5 and KVAERNO5.c[-1] == pytest.approx(1.0)
    rows = [list(r) for r in KVAERNO5.a_lower]
    rows[4][2] += 1e-6
    rows[4][4] -= 1e-6  # keep c6 = 1, break the order-4 conditions of b̂
    with pytest.raises(ValueError, match="order"):
        ESDIRKTableau("bad", KVAERNO5.gamma, tuple(tuple(r) for r in rows), 5, 4, "perturbed")


@pytest.mark.parametrize("rtol", [1e-5, 1e-8])
def test_linear_stiff_system_matches_expm(rtol):
    atol = rtol * 1e-2
    y0 = np.array([1.0, 0.5])
    t = np.array([0.0, 1e-4, 1e-3, 0.1, 1.0, 5.0])
    ref = np.stack([scipy.linalg.expm(_A * ti) @ y0 for ti in t])
    st = SolverStats()
    out = odeint(_linear, torch.tensor(y0, dtype=D), torch.tensor(t, dtype=D), method="kvaerno5",
                 rtol=rtol, atol=atol, stats=st)
    assert _rel_err(out, ref, rtol, atol) < 10
    # an explicit method needs |h| < 3.3e-4 for stability on t in [1e-3, 5]: >= 1.5e4 steps
    assert st.steps_accepted < 300


def test_robertson_within_tolerance_of_radau_in_far_fewer_steps_than_dopri5():
    t = np.array([0.0, 1e-2, 1.0, 100.0, 1e4, 1e5])
    rtol, atol = 1e-6, 1e-10
    ref = scipy.integrate.solve_ivp(_rob_np, (0, t[-1]), [1.0, 0, 0], method="Radau", rtol=1e-10, atol=1e-14,
                                    t_eval=t).y.T
    st = SolverStats()
    out = odeint(_robertson, torch.tensor([1.0, 0, 0], dtype=D), torch.tensor(t, dtype=D), method="kvaerno5",
                 rtol=rtol, atol=atol, stats=st)
    assert _rel_err(out, ref, rtol, atol) < 100
    steps = st.steps_accepted + st.steps_rejected
    # dopri5 over the first 1/100 of the span alone hits a 1,000-step cap (stability, not accuracy)
    st5 = SolverStats()
    odeint(_robertson, torch.tensor([1.0, 0, 0], dtype=D), torch.tensor([0.0, 1e3], dtype=D), method="dopri5",
           rtol=rtol, atol=atol, stats=st5, options=dict(max_num_steps=1000, raise_on_failure=False))
    assert int(st5.status) == SolveStatus.MAX_NUM_STEPS
    assert 10 * steps <= 1000


def test_van_der_pol_mu_1000_matches_radau_and_beats_dopri5():
    T = 3.0
    t = np.linspace(0, T, 4)
    rtol, atol = 1e-6, 1e-8
    ref = scipy.integrate.solve_ivp(_vdp_np, (0, T), [2.0, 0.0], method="Radau", rtol=1e-10, atol=1e-12,
                                    jac=_vdp_jac, t_eval=t).y.T
    st = SolverStats()
    out = odeint(_vdp, torch.tensor([2.0, 0.0], dtype=D), torch.tensor(t, dtype=D), method="kvaerno5",
                 rtol=rtol, atol=atol, stats=st)
    assert _rel_err(out, ref, rtol, atol) < 100
    st5 = SolverStats()
    odeint(_vdp, torch.tensor([2.0, 0.0], dtype=D), torch.tensor(t, dtype=D), method="dopri5", rtol=rtol,
           atol=atol, stats=st5, options=dict(max_num_steps=1000, raise_on_failure=False))
    # dopri5 needs ~2,700 steps here (|h| <= 3.3/μ): it stops at the cap, kvaerno5 takes < 100
    assert int(st5.status) == SolveStatus.MAX_NUM_STEPS
    assert 10 * (st.steps_accepted + st.steps_rejected) <= st5.steps_accepted + st5.steps_rejected


def test_failed_newton_solves_reject_and_shrink_the_step():
    # with at most 3 Newton iterations per stage many stage solves fail on Robertson: each failure
    # rejects the step (retried smaller) and the solve still ends within tolerance
    T, rtol, atol = 0.01, 1e-6, 1e-10
    ref = scipy.integrate.solve_ivp(_rob_np, (0, T), [1.0, 0, 0], method="Radau", rtol=1e-10, atol=1e-14,
                                    t_eval=[T]).y.T
    t, y0 = torch.tensor([0.0, T], dtype=D), torch.tensor([1.0, 0, 0], dtype=D)
    base, capped = SolverStats(), SolverStats()
    odeint(_robertson, y0, t, method="kvaerno5", rtol=rtol, atol=atol, stats=base)
    out = odeint(_robertson, y0, t, method="kvaerno5", rtol=rtol, atol=atol, stats=capped,
                 options=dict(newton_max_iters=2))
    assert capped.steps_rejected >= base.steps_rejected + 10
    assert _rel_err(out[-1:], ref, rtol, atol) < 100


def test_newton_that_never_converges_is_a_named_failure():
    # past t = 0.5 the field is NaN: every stage solve there fails, each failure shrinks the step,
    # and the solve ends with the named error (NonFiniteStateError) whose message names Newton
    def f(t, y):
        return torch.full_like(y, float("nan")) if t > 0.5 else -y

    with pytest.raises(NonFiniteStateError, match="Newton solve of stage"):
        odeint(f, torch.tensor([1.0], dtype=D), torch.tensor([0.0, 1.0], dtype=D), method="kvaerno5")
    with pytest.raises(ValueError, match="newton_tol"):
        odeint(_linear, torch.tensor([1.0, 0.5], dtype=D), torch.tensor([0.0, 1.0], dtype=D), method="kvaerno5",
               options=dict(newton_tol=0.0))


def test_backprop_through_the_solve_matches_the_closed_form():
    # y' = -k y², y(T) = y0 / (1 + k y0 T): dy(T)/dk = -y0² T / (1 + k y0 T)²
    k = torch.tensor(50.0, dtype=D, requires_grad=True)
    y0, T = 2.0, 1.0
    out = odeint(lambda t, y: -k * y**2, torch.tensor([y0], dtype=D), torch.tensor([0.0, T], dtype=D),
                 method="kvaerno5", rtol=1e-8, atol=1e-10)
    (g,) = torch.autograd.grad(out[-1, 0], k)
    assert float(out[-1, 0].detach()) == pytest.approx(y0 / (1 + 50 * y0 * T), rel=1e-6)
    assert float(g) == pytest.approx(-(y0**2) * T / (1 + 50 * y0 * T) ** 2, rel=1e-4)


def test_refusals_are_named():
    y0, t = torch.tensor([1.0, 0.5], dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(ValueError, match="odeint_adjoint does not support 'kvaerno5'"):
        odeint_adjoint(_linear, y0, t, method="kvaerno5")
    with pytest.raises(ValueError, match="per_sample"):
        odeint(_linear, y0, t, method="kvaerno5", options=dict(step_control="per_sample"))


def test_float32_state_at_default_tolerances():
    # the Newton test is floored at 100 eps |y|: float32 at rtol 1e-7 must not loop on Newton failures
    t = np.array([0.0, 3.0])
    ref = scipy.integrate.solve_ivp(_vdp_np, (0, 3.0), [2.0, 0.0], method="Radau", rtol=1e-10, atol=1e-12,
                                    jac=_vdp_jac, t_eval=t).y.T
    st = SolverStats()
    out = odeint(_vdp, torch.tensor([2.0, 0.0]), torch.tensor(t, dtype=torch.float32), method="kvaerno5",
                 stats=st, options=dict(max_num_steps=500))
    assert out.dtype == torch.float32 and int(st.status) == SolveStatus.SUCCESS
    assert np.max(np.abs(out.double().numpy() - ref)) < 1e-4
