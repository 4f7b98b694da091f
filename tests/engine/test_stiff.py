"""The adaptive stiff solver (method="kvaerno5", issue 16 item 6): accuracy against closed forms and
scipy's Radau at a tight tolerance, its step counts against dopri5, per-sample stepping (rows equal
their own solves), gradients by backprop and by odeint_adjoint, named refusals.
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


def test_per_sample_rows_equal_single_solves_and_the_closed_form():
    # y' = A y per row, each row its own y0 and (B, T) output grid: every row equals its own solve
    # alone (B = 1) and in a reordered batch, and expm within the tolerance
    rtol, atol = 1e-7, 1e-9
    y0 = torch.tensor([[1.0, 0.5], [-2.0, 0.3], [0.0, 1.0]], dtype=D)
    t = torch.tensor([[0.0, 1e-4, 0.1, 1.0], [0.2, 0.25, 0.5, 3.0], [0.0, 1e-3, 2e-3, 5.0]], dtype=D)
    f = lambda t, y: y @ torch.as_tensor(_A.T, dtype=y.dtype)  # noqa: E731
    kw = dict(method="kvaerno5", rtol=rtol, atol=atol, options=dict(step_control="per_sample"))
    st = SolverStats()
    out = odeint(f, y0, t, stats=st, **kw)  # (T, B, 2)
    assert st.status.tolist() == [0, 0, 0]
    swapped = odeint(f, y0[[2, 0]], t[[2, 0]], **kw)
    for b in range(3):
        ref = np.stack([scipy.linalg.expm(_A * float(ti - t[b, 0])) @ y0[b].numpy() for ti in t[b]])
        assert _rel_err(out[:, b], ref, rtol, atol) < 10
    alone = odeint(f, y0[1:2], t[1:2], **kw)[:, 0]
    np.testing.assert_allclose(out[:, 1].numpy(), alone.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(swapped[:, 1].numpy(), out[:, 0].numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(swapped[:, 0].numpy(), out[:, 2].numpy(), rtol=1e-12, atol=1e-15)


def test_per_sample_robertson_matches_radau_and_the_joint_solve():
    rtol, atol = 1e-6, 1e-10
    t = np.array([0.0, 1e-3, 0.1, 10.0])
    y0 = np.array([[1.0, 0.0, 0.0], [0.5, 0.0, 0.5]])
    rob = lambda t, y: torch.stack([_robertson(None, r) for r in y])  # noqa: E731
    out = odeint(rob, torch.tensor(y0, dtype=D), torch.tensor(t, dtype=D), method="kvaerno5", rtol=rtol, atol=atol,
                 options=dict(step_control="per_sample"))
    for b in range(2):
        ref = scipy.integrate.solve_ivp(_rob_np, (0, t[-1]), y0[b], method="Radau", rtol=1e-10, atol=1e-14,
                                        t_eval=t).y.T
        assert _rel_err(out[:, b], ref, rtol, atol) < 10
        joint = odeint(_robertson, torch.tensor(y0[b], dtype=D), torch.tensor(t, dtype=D), method="kvaerno5",
                       rtol=rtol, atol=atol)
        np.testing.assert_allclose(out[:, b].numpy(), joint.numpy(), rtol=1e-9, atol=1e-14)


def test_per_sample_newton_failure_rejects_only_its_row():
    # row 1's field is NaN past t = 0.5: its Newton solves fail, its steps shrink, it ends NON_FINITE;
    # row 0 is unaffected (same values as alone)
    def f(t, y):
        bad = (t > 0.5) & (y[:, 1] > 0.75 * y[:, 0])
        return torch.where(bad[:, None], torch.full_like(y, float("nan")), -y)

    y0, t = torch.tensor([[1.0, 0.5], [1.0, 1.0]], dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    kw = dict(method="kvaerno5", options=dict(step_control="per_sample", raise_on_failure=False))
    st = SolverStats()
    out = odeint(f, y0, t, stats=st, **kw)
    assert st.status.tolist() == [SolveStatus.SUCCESS, SolveStatus.NON_FINITE]
    assert torch.isnan(out[-1, 1]).all()
    np.testing.assert_allclose(out[:, 0].numpy(), odeint(f, y0[:1], t, **kw)[:, 0].numpy(), rtol=1e-13)


class _Relax(torch.nn.Module):
    """y' = −k (y − cos t): y(t) = k (k cos t + sin t)/(k² + 1) + (y0 − k²/(k² + 1)) e^{−kt}."""

    def __init__(self, k):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=D))

    def forward(self, t, y):
        return -self.k * (y - torch.cos(t))


def _relax_grads(k, y0, t, w):
    """d/dk and d/dy0 of Σ w_i y(t_i) by complex-step differentiation of the closed form."""
    def loss(kk, yy):
        return np.sum(w * (kk / (kk**2 + 1) * (kk * np.cos(t) + np.sin(t)) + (yy - kk**2 / (kk**2 + 1))
                           * np.exp(-kk * t)))
    return loss(k + 1e-30j, y0).imag / 1e-30, loss(k, y0 + 1e-30j).imag / 1e-30


@pytest.mark.parametrize("k, mode, rtol", [(1e3, "checkpoint", 1e-7), (10.0, "backsolve", 1e-6)])
def test_odeint_adjoint_gradients_match_the_closed_form(k, mode, rtol):
    # checkpoint: the exact gradient of the forward steps (stiff k = 1e3, an output inside the transient);
    # backsolve: the augmented [y, a, a_θ] system solved backwards by kvaerno5 with the block Newton
    # matrix diag(I − hγJ, I + hγJᵀ, I) (only mildly stiff: backwards, y's fast modes grow)
    t = np.array([0.0, 1e-3, 0.5, 1.0]) if mode == "checkpoint" else np.array([0.0, 0.1, 0.5, 1.0])
    w = np.array([0.0, 1.0, 1.0, 1.0])
    f, y0 = _Relax(k), torch.tensor([0.0], dtype=D, requires_grad=True)
    st = SolverStats()
    out = odeint_adjoint(f, y0, torch.tensor(t, dtype=D), method="kvaerno5", rtol=rtol, atol=rtol * 1e-2,
                         adjoint_mode=mode, stats=st)
    (out[:, 0] * torch.tensor(w, dtype=D)).sum().backward()
    gk, gy = _relax_grads(k, 0.0, t, w)
    assert st.nfe_backward > 0
    assert float(f.k.grad) == pytest.approx(gk, rel=100 * rtol)
    assert float(y0.grad) == pytest.approx(gy, rel=100 * rtol)


def test_refusals_are_named():
    with pytest.raises(ValueError, match="newton_tol"):
        odeint(_linear, torch.ones(1, 2, dtype=D), torch.tensor([0.0, 1.0], dtype=D), method="kvaerno5",
               options=dict(step_control="per_sample", newton_tol=-1.0))


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
