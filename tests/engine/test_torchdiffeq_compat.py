"""torchdiffeq's defaults and options as node_engine serves them (issue 16): fixed grids on the output
times, grid_constructor, perturb, min/max_step, callable norms, the dtype option and derivative
casts, step callbacks, gradients with respect to t, the low-order pairs and scipy_solver.
Right values are analytic (or scipy's)."""

import dataclasses
import math
import warnings

import numpy as np
import pytest
import scipy.integrate
import torch

from node_engine import SolverStats, SolverError, odeint, odeint_adjoint
from node_engine.errors import NewtonConvergenceError
from node_engine.solvers import IMPLICIT

from .problems import LOW_ORDER_ADAPTIVE

f64 = torch.float64


def test_fixed_grid_steps_on_output_times_by_default():
    # the lecture table: euler on y' = y, t = 0..4 gives 1, 2, 4, 8, 16
    y = odeint(lambda t, y: y, torch.tensor(1.0, dtype=f64), torch.arange(5, dtype=f64), method="euler")
    assert y.tolist() == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_fixed_grid_with_two_times_and_no_step_size_warns():
    with pytest.warns(UserWarning, match="step_size"):
        y = odeint(lambda t, y: y, torch.tensor(1.0, dtype=f64), torch.tensor([0.0, 1.0], dtype=f64), method="rk4")
    assert float(y[-1]) == pytest.approx(1 + 1 + 1 / 2 + 1 / 6 + 1 / 24, abs=1e-15)  # one rk4 step of y' = y


def test_grid_constructor_gets_func_y0_t_and_sets_the_grid():
    seen = {}

    def grid(func, y0, t):
        seen["t"] = t.tolist()
        return torch.linspace(0, 1, 11)

    y = odeint(lambda t, y: y, torch.tensor(1.0, dtype=f64), torch.tensor([0.0, 1.0], dtype=f64), method="euler",
               options=dict(grid_constructor=grid))
    assert seen["t"] == [0.0, 1.0]
    assert float(y[-1]) == pytest.approx(1.1**10, rel=1e-14)
    with pytest.raises(ValueError, match="at most one"):
        odeint(lambda t, y: y, torch.tensor(1.0), torch.tensor([0.0, 1.0]), method="euler",
               options=dict(grid_constructor=grid, step_size=0.1))


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_perturb_samples_a_jump_on_the_right_side(dtype):
    # y' = +1 for t <= 0.5, -1 after: y(1) = 0. Euler with steps of 0.5 hits the jump at 0.5.
    def f(t, y):
        return torch.ones_like(y) if float(t) <= 0.5 else -torch.ones_like(y)

    y0, t = torch.zeros(1, dtype=dtype), torch.tensor([0.0, 1.0], dtype=dtype)
    plain = odeint(f, y0, t, method="euler", options=dict(step_size=0.5))
    pert = odeint(f, y0, t, method="euler", options=dict(step_size=0.5, perturb=True))
    assert float(plain[-1]) == pytest.approx(1.0)  # f(0.5) = +1: the left value
    assert float(pert[-1]) == pytest.approx(0.0, abs=1e-6)


def test_min_and_max_step_bound_the_accepted_steps():
    steps = []

    class F(torch.nn.Module):
        def forward(self, t, y):
            return torch.cos(t) * y

        def callback_accept_step(self, t0, y0, dt):
            steps.append(float(dt))

    t = torch.tensor([0.0, 10.0], dtype=f64)
    y0 = torch.ones(1, dtype=f64)
    y = odeint(F(), y0, t, rtol=1e-6, atol=1e-8, options=dict(max_step=0.25))
    assert max(steps) <= 0.25 + 1e-15 and float(y[-1]) == pytest.approx(math.exp(math.sin(10.0)), rel=1e-5)
    steps.clear()
    stats = SolverStats()
    odeint(F(), y0, t, rtol=1e-12, atol=1e-12, options=dict(min_step=2.0), stats=stats)
    assert min(steps[:-1]) >= 2.0 and stats.steps_rejected == 0  # a step at min_step is always accepted
    with pytest.raises(ValueError, match="min_step"):
        odeint(F(), y0, t, options=dict(min_step=2.0, max_step=1.0))


def test_callable_norm_sees_the_users_layout_and_a_larger_norm_takes_more_steps():
    shapes = []

    def norm(v):
        shapes.append(tuple(tuple(x.shape) for x in v))
        return max(x.abs().max() for x in v)

    y0 = (torch.tensor(1.0, dtype=f64), torch.ones(2, 2, dtype=f64))
    f = lambda t, y: (-y[0], -2 * y[1])  # noqa: E731
    y = odeint(f, y0, torch.tensor([0.0, 1.0], dtype=f64), options=dict(norm=norm))
    assert shapes and set(shapes) == {((), (2, 2))}
    assert float(y[0][-1]) == pytest.approx(math.exp(-1), rel=1e-6)
    nfe = []
    for k in (1.0, 10.0):
        stats = SolverStats()
        odeint(lambda t, y: torch.sin(5 * t) * y, torch.ones(2, dtype=f64), torch.tensor([0.0, 3.0], dtype=f64),
               options=dict(norm=lambda v, k=k: k * v.abs().max()), stats=stats)
        nfe.append(stats.nfe_forward)
    assert nfe[0] < nfe[1]
    with pytest.raises(ValueError, match="norm"):
        odeint(f, y0, torch.tensor([0.0, 1.0], dtype=f64), options=dict(norm="rms"))


def test_adjoint_norm_callable_gets_t_y_a_and_parameter_adjoints():
    got = []
    w = torch.tensor([0.5, -0.3], dtype=f64, requires_grad=True)

    def adj_norm(parts):
        got.append(tuple(tuple(p.shape) for p in parts))
        return max(p.abs().max() for p in parts)

    y0 = torch.tensor([1.0, 2.0], dtype=f64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=f64)
    y = odeint_adjoint(lambda t, y: w * y, y0, t, adjoint_params=(w,), adjoint_options=dict(norm=adj_norm))
    y[-1].sum().backward()
    assert got and set(got) == {((), (2,), (2,), (2,))}
    # d/dw_i of y_i(1) = y0_i exp(w_i) is y0_i exp(w_i)
    assert torch.allclose(w.grad, torch.tensor([1.0, 2.0], dtype=f64) * torch.exp(w.detach()), rtol=1e-5)


def test_derivative_of_another_dtype_is_cast_and_a_wrong_shape_still_raises():
    t = torch.tensor([0.0, 1.0], dtype=f64)
    y = odeint(lambda t, y: (-y).double(), torch.ones(2), t)  # float32 state, float64 derivative
    assert y.dtype == torch.float32 and float(y[-1, 0]) == pytest.approx(math.exp(-1), rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        odeint(lambda t, y: torch.zeros(3, dtype=f64), torch.ones(2), t)


def test_dtype_option_sets_the_time_dtype_func_receives():
    seen = set()

    def f(t, y):
        seen.add(t.dtype)
        return -y

    odeint(f, torch.ones(1), torch.tensor([0.0, 1.0]), options=dict(dtype=f64))
    assert seen == {f64}
    with pytest.raises(ValueError, match="dtype"):
        odeint(f, torch.ones(1), torch.tensor([0.0, 1.0]), options=dict(dtype=torch.int64))


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_step_callbacks_count_every_trial_step(method):
    calls = {"step": 0, "accept": 0, "reject": 0, "step_adjoint": 0}

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(-0.5, dtype=f64))

        def forward(self, t, y):
            return self.w * y * torch.cos(3 * t)

        def callback_step(self, t0, y0, dt):
            assert y0.shape == (2,) and t0.dtype == f64
            calls["step"] += 1

        def callback_accept_step(self, t0, y0, dt):
            calls["accept"] += 1

        def callback_reject_step(self, t0, y0, dt):
            calls["reject"] += 1

        def callback_step_adjoint(self, t0, y0, dt):
            calls["step_adjoint"] += 1

    stats = SolverStats()
    opts = dict(step_size=0.1) if method == "rk4" else None
    t = torch.tensor([0.0, 1.0], dtype=f64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y = odeint_adjoint(F(), torch.ones(2, dtype=f64), t, method=method, options=opts, stats=stats)
    if method == "rk4":
        assert calls["step"] == 10 and calls["accept"] == calls["reject"] == 0
        assert any("never called" in str(x.message) for x in w)
    else:
        assert calls["step"] == calls["accept"] + calls["reject"] == stats.steps_accepted + stats.steps_rejected
        assert calls["accept"] == stats.steps_accepted
    assert calls["step_adjoint"] == 0
    y[-1].sum().backward()
    assert calls["step_adjoint"] > 0


@pytest.mark.parametrize("adjoint", [False, True])
def test_gradients_with_respect_to_t(adjoint):
    # y' = -y: y_i = y0 exp(-(t_i - t_0)); L = Σ_{i>=1} y_i: dL/dt_i = -y_i, dL/dt_0 = Σ_{i>=1} y_i
    t = torch.tensor([0.2, 0.7, 1.5, 2.0], dtype=f64, requires_grad=True)
    y0 = torch.tensor([1.5], dtype=f64)
    solve = odeint_adjoint if adjoint else odeint
    y = solve(lambda t, y: -y, y0, t, rtol=1e-10, atol=1e-12)
    y[1:].sum().backward()
    exact = 1.5 * np.exp(-(t.detach().numpy() - 0.2))
    want = np.concatenate([[exact[1:].sum()], -exact[1:]])
    np.testing.assert_allclose(t.grad.numpy(), want, rtol=1e-7)


def test_gradient_with_respect_to_t_matches_finite_differences_through_a_fixed_grid():
    # rk4 stepping on the output times is exact for y' = 2t (a quadratic): the FD slope is f(t_i)
    t = torch.tensor([0.0, 0.5, 1.25], dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda tt: odeint(lambda s, y: 2 * s * torch.ones_like(y),
                                                      torch.zeros(1, dtype=f64), tt, method="rk4"), (t,))


@pytest.mark.parametrize("method", LOW_ORDER_ADAPTIVE)
def test_low_order_pairs_meet_loose_tolerances(method):
    # y' = -2 t y², y(0) = 1: y = 1 / (1 + t²); global error within 100x the (loose) tolerance
    t = torch.linspace(0, 2, 7, dtype=f64)
    stats = SolverStats()
    y = odeint(lambda t, y: -2 * t * y**2, torch.ones(1, dtype=f64), t, rtol=1e-4, atol=1e-6, method=method,
               stats=stats)
    exact = 1 / (1 + t**2)
    assert float((y[:, 0] - exact).abs().max()) < 100 * (1e-6 + 1e-4)
    assert stats.steps_accepted < 2000


@pytest.mark.parametrize("solver", ["RK45", "DOP853", "Radau", "BDF", "LSODA"])
def test_scipy_solver_matches_the_analytic_solution(solver):
    t = torch.linspace(0, 2, 5, dtype=f64)
    y = odeint(lambda t, y: -2 * t * y**2, torch.ones(1, dtype=f64), t, method="scipy_solver", rtol=1e-8,
               atol=1e-10, options=dict(solver=solver))
    assert float((y[:, 0] - 1 / (1 + t**2)).abs().max()) < 1e-5


def test_scipy_solver_errors_are_named():
    t = torch.tensor([0.0, 1.0], dtype=f64)
    with pytest.raises(ValueError, match="solver"):
        odeint(lambda t, y: y, torch.ones(1, dtype=f64), t, method="scipy_solver", options=dict(solver="Euler"))
    with pytest.raises(SolverError, match="scipy_solver"):  # y' = y², y(0) = 1 blows up at t = 1
        odeint(lambda t, y: y**2, torch.ones(1, dtype=f64), torch.tensor([0.0, 2.0], dtype=f64),
               method="scipy_solver", options=dict(solver="RK45"))
    with pytest.raises(ValueError, match="checkpoint"):
        odeint_adjoint(lambda t, y: y, torch.ones(1, dtype=f64, requires_grad=True), t, method="scipy_solver",
                       adjoint_mode="checkpoint")


def test_scipy_solver_adjoint_gradient():
    # y' = a y: dy(1)/da = y0 exp(a) at y0 = 1
    a = torch.tensor(0.3, dtype=f64, requires_grad=True)
    y = odeint_adjoint(lambda t, y: a * y, torch.ones(1, dtype=f64), torch.tensor([0.0, 1.0], dtype=f64),
                       method="scipy_solver", adjoint_params=(a,), rtol=1e-9, atol=1e-11,
                       options=dict(solver="DOP853"))
    y[-1].sum().backward()
    assert float(a.grad) == pytest.approx(math.exp(0.3), rel=1e-6)
    ref = scipy.integrate.solve_ivp(lambda t, y: 0.3 * y, (0, 1), [1.0], rtol=1e-12, atol=1e-12).y[0, -1]
    assert float(y[-1].detach()) == pytest.approx(ref, rel=1e-7)


@pytest.mark.parametrize("method", sorted(IMPLICIT))
def test_implicit_methods_converge_with_their_order_and_differentiate(method):
    # y' = -2 t y², y(0) = 1: y(2) = 1/5; error ratio of n and 2n steps gives the order
    errs = []
    for n in (16, 32):
        y = odeint(lambda t, y: -2 * t * y**2, torch.ones(1, dtype=f64), torch.linspace(0, 2, n + 1, dtype=f64),
                   method=method)
        errs.append(abs(float(y[-1, 0]) - 0.2))
    p = IMPLICIT[method].order
    assert p - 0.35 <= math.log2(errs[0] / errs[1]) <= p + 0.5, errs
    # y' = a y: d y(1) / d a = y(1) for the discrete solve too (the stages are linear in a·h)
    a = torch.tensor(-0.7, dtype=f64, requires_grad=True)
    y = odeint(lambda t, y: a * y, torch.ones(1, dtype=f64), torch.linspace(0, 1, 11, dtype=f64), method=method)
    y[-1].sum().backward()
    eps = 1e-6
    fd = [float(odeint(lambda t, y: (a.detach() + s) * y, torch.ones(1, dtype=f64),
                       torch.linspace(0, 1, 11, dtype=f64), method=method)[-1]) for s in (eps, -eps)]
    assert float(a.grad) == pytest.approx((fd[0] - fd[1]) / (2 * eps), rel=1e-6)


def test_implicit_newton_failure_is_named():
    # y' = y², y(0) = 1 with h = 1: backward Euler's stage equation y1 = 1 + y1² has no real root
    with pytest.raises(NewtonConvergenceError, match="Newton"):
        odeint(lambda t, y: y**2, torch.ones(1, dtype=f64), torch.tensor([0.0, 1.0], dtype=f64),
               method="implicit_euler", options=dict(step_size=1.0, newton_max_iters=20))


def test_implicit_tableau_typo_is_caught():
    tab = IMPLICIT["gl4"]
    with pytest.raises(ValueError, match="order"):
        dataclasses.replace(tab, b=(0.5 + 1e-4, 0.5 - 1e-4))


@pytest.mark.parametrize("method, options", [("dopri5", None), ("rk4", dict(step_size=0.01))])
@pytest.mark.parametrize("adjoint", [False, True])
def test_event_time_state_and_gradient(method, options, adjoint):
    # y' = -k y, y(0) = y0; event y = 0.5: τ = ln(2 y0) / k, dτ/dy0 = 1/(k y0), dτ/dk = -τ/k
    k = torch.tensor(0.8, dtype=f64, requires_grad=True)
    y0 = torch.tensor([1.5], dtype=f64, requires_grad=True)
    solve = odeint_adjoint if adjoint else odeint
    kw = dict(adjoint_params=(k,)) if adjoint else {}
    te, sol = solve(lambda t, y: -k * y, y0, torch.tensor([0.0, 1.0], dtype=f64), method=method, options=options,
                    event_fn=lambda t, y: y.sum() - 0.5, **kw)
    tau = math.log(3.0) / 0.8
    assert float(te.detach()) == pytest.approx(tau, rel=1e-6) and sol.shape == (2, 1)
    assert float(sol[-1, 0].detach()) == pytest.approx(0.5, rel=1e-6)
    te.backward()
    assert float(y0.grad) == pytest.approx(1 / (0.8 * 1.5), rel=1e-5)
    assert float(k.grad) == pytest.approx(-tau / 0.8, rel=1e-5)


def test_odeint_event_reverse_time_searches_backwards():
    from node_engine import odeint_event

    # y' = 1, y(2) = 2: y = t; event y = 0.5 backwards from t0 = 2 (beyond one window of length 1)
    te, sol = odeint_event(lambda t, y: torch.ones_like(y), torch.tensor([2.0], dtype=f64),
                           torch.tensor(2.0, dtype=f64), event_fn=lambda t, y: y.sum() - 0.5, reverse_time=True)
    assert float(te) == pytest.approx(0.5, abs=1e-9) and float(sol[-1, 0]) == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams", "fixed_adams"])
def test_adams_methods_are_fourth_order_on_nonuniform_grids_and_differentiate(method):
    # y' = cos(3t) y, y(0) = 1: y(2) = exp(sin(6)/3); the output time 1.234 makes the grid non-uniform
    exact = math.exp(math.sin(6.0) / 3)
    errs = []
    for h in (2 / 16, 2 / 32):
        y = odeint(lambda t, y: torch.cos(3 * t) * y, torch.ones(1, dtype=f64),
                   torch.tensor([0.0, 1.234, 2.0], dtype=f64), method=method, options=dict(step_size=h))
        errs.append(abs(float(y[-1, 0]) - exact))
    assert math.log2(errs[0] / errs[1]) >= 4 - 0.35, errs
    a = torch.tensor(-0.7, dtype=f64, requires_grad=True)
    t = torch.linspace(0, 1, 21, dtype=f64)
    y = odeint(lambda t, y: a * y, torch.ones(1, dtype=f64), t, method=method)
    y[-1].sum().backward()
    eps = 1e-6
    fd = [float(odeint(lambda t, y: (a.detach() + s) * y, torch.ones(1, dtype=f64), t, method=method)[-1])
          for s in (eps, -eps)]
    assert float(a.grad) == pytest.approx((fd[0] - fd[1]) / (2 * eps), rel=1e-6)
