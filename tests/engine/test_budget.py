"""The solver's compute bound (``options["max_nfe"]``) and stop signal (``options["stop"]``).

Evaluation counts come from the test's own counting field, not from the solver's statistics; the
fixed-grid counts are analytic (rk4: 4 evaluations per step, midpoint 2, euler 1)."""

import pytest
import torch

from node_engine import NFEBudgetExceeded, SolveCancelled, SolverStats, SolveStatus, odeint, odeint_adjoint

f64 = torch.float64
STAGES = {"euler": 1, "midpoint": 2, "rk4": 4}


class Counting(torch.nn.Module):
    """y' = -θ y with a call counter (and optionally a flag raised after ``trip`` calls)."""

    def __init__(self, trip: int | None = None):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(1.0, dtype=f64))
        self.calls = 0
        self.trip = trip

    def forward(self, t, y):
        self.calls += 1
        return -self.theta * y

    def tripped(self) -> bool:
        return self.trip is not None and self.calls >= self.trip


T10 = torch.arange(11, dtype=f64) * 0.125  # 10 steps of 0.125 (exact in binary) with step_size=0.125


@pytest.mark.parametrize("method", sorted(STAGES))
def test_fixed_grid_budget_is_exact(method):
    """10 steps of s stages need 10·s evaluations: a budget of 10·s succeeds (and changes nothing),
    one less raises; a budget of 4·s - 1 stops after the 4th step, started at t = 0.375."""
    need = 10 * STAGES[method]
    y0 = torch.tensor([1.0], dtype=f64)
    f = Counting()
    ref = odeint(f, y0, T10, method=method, options=dict(step_size=0.125))
    assert f.calls == need
    y = odeint(Counting(), y0, T10, method=method, options=dict(step_size=0.125, max_nfe=need))
    assert torch.equal(y, ref)
    torch.testing.assert_close(y[:, 0], torch.exp(-T10), rtol=0.15, atol=0)
    with pytest.raises(NFEBudgetExceeded, match="max_nfe=%d" % (need - 1)):
        odeint(Counting(), y0, T10, method=method, options=dict(step_size=0.125, max_nfe=need - 1))
    f = Counting()
    stats = SolverStats()
    with pytest.raises(NFEBudgetExceeded) as ei:
        odeint(f, y0, T10, method=method, options=dict(step_size=0.125, max_nfe=4 * STAGES[method] - 1), stats=stats)
    assert f.calls == 4 * STAGES[method]
    assert ei.value.t == 0.375
    assert stats.status.tolist() == [SolveStatus.NFE_BUDGET]


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "tsit5"])
@pytest.mark.parametrize("step_control", ["joint", "per_sample"])
def test_adaptive_budget_is_exact(method, step_control):
    """An adaptive solve that needs n evaluations (counted by the field) succeeds with max_nfe = n,
    with the same answer, and raises with n - 1."""
    y0 = torch.tensor([[1.0], [2.0]], dtype=f64)
    opts = dict(step_control=step_control)
    f = Counting()
    ref = odeint(f, y0, T10, rtol=1e-9, atol=1e-12, method=method, options=opts)
    n = f.calls
    assert n > 20
    y = odeint(Counting(), y0, T10, rtol=1e-9, atol=1e-12, method=method, options={**opts, "max_nfe": n})
    assert torch.equal(y, ref)
    torch.testing.assert_close(y[:, :, 0], y0[:, 0] * torch.exp(-T10)[:, None], rtol=1e-7, atol=0)
    with pytest.raises(NFEBudgetExceeded):
        odeint(Counting(), y0, T10, rtol=1e-9, atol=1e-12, method=method, options={**opts, "max_nfe": n - 1})


def test_budget_per_sample_quiet_marks_every_active_row():
    """raise_on_failure=False: the rows still running when the budget ran out get NFE_BUDGET, their
    later outputs are NaN, the earlier ones are right."""
    y0 = torch.tensor([[1.0], [2.0]], dtype=f64)
    stats = SolverStats()
    y = odeint(Counting(), y0, T10, rtol=1e-9, atol=1e-12,
               options=dict(step_control="per_sample", raise_on_failure=False, max_nfe=30), stats=stats)
    assert stats.status.tolist() == [SolveStatus.NFE_BUDGET, SolveStatus.NFE_BUDGET]
    assert torch.isnan(y[-1]).all()
    reached = ~torch.isnan(y[:, 0, 0])
    assert 1 < int(reached.sum()) < len(T10)
    torch.testing.assert_close(y[reached, :, 0], y0[:, 0] * torch.exp(-T10[reached])[:, None], rtol=1e-7, atol=0)


@pytest.mark.parametrize("method,options", [("dopri5", {}), ("dopri5", dict(step_control="per_sample")),
                                            ("rk4", dict(step_size=1e-3)), ("dopri8", {})])
def test_stop_ends_the_solve_at_the_next_step(method, options):
    """stop() turns True after 50 evaluations: the solve raises SolveCancelled within one more step
    (at most one step's stages later), also with raise_on_failure=False."""
    f = Counting(trip=50)
    y0 = torch.tensor([[1.0]], dtype=f64)
    t = torch.tensor([0.0, 100.0], dtype=f64)
    opts = {**options, "stop": f.tripped}
    if method != "rk4":
        opts["raise_on_failure"] = False
    with pytest.raises(SolveCancelled) as ei:
        odeint(f, y0, t, rtol=1e-12, atol=1e-14, method=method, options=opts)
    assert 50 <= f.calls <= 50 + 16  # dopri8: 12 stages, plus a dense-output step at most
    assert 0 < ei.value.t < 100


def test_defaults_change_nothing():
    """No budget, a stop that never fires and a budget never reached give the same bits and NFE."""
    y0 = torch.tensor([0.3, -1.2], dtype=f64)
    f = Counting()
    ref = odeint(f, y0, T10)
    for opts in (dict(max_nfe=None, stop=None), dict(stop=lambda: False), dict(max_nfe=10**9)):
        g = Counting()
        assert torch.equal(odeint(g, y0, T10, options=opts), ref)
        assert g.calls == f.calls


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_adjoint_backward_obeys_stop_and_budget(mode):
    """The backward pass takes stop and max_nfe from the forward options."""
    y0 = torch.tensor([1.0], dtype=f64)
    flag = {"stop": False}
    f = Counting()
    y = odeint_adjoint(f, y0, T10, adjoint_mode=mode, options=dict(stop=lambda: flag["stop"]))
    flag["stop"] = True
    with pytest.raises(SolveCancelled):
        y.sum().backward()
    f = Counting()
    y = odeint_adjoint(f, y0, T10, adjoint_mode=mode, options=dict(max_nfe=10**6))
    n_forward = f.calls
    y.sum().backward()  # within budget: the gradient is the closed form d/dθ Σ exp(-θ t) = Σ -t exp(-t)
    torch.testing.assert_close(f.theta.grad, (-T10 * torch.exp(-T10)).sum(), rtol=1e-5, atol=0)
    f = Counting()
    y = odeint_adjoint(f, y0, T10, adjoint_mode=mode, options=dict(max_nfe=n_forward))
    with pytest.raises(NFEBudgetExceeded):
        y.sum().backward()


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "10"])
def test_bad_max_nfe_is_refused(bad):
    with pytest.raises(ValueError, match="max_nfe"):
        odeint(Counting(), torch.ones(1, dtype=f64), T10, options=dict(max_nfe=bad))


def test_bad_stop_is_refused():
    with pytest.raises(ValueError, match="stop"):
        odeint(Counting(), torch.ones(1, dtype=f64), T10, method="rk4", options=dict(step_size=0.125, stop=3))


def test_budget_error_names_the_option():
    with pytest.raises(NFEBudgetExceeded, match=r"options\['max_nfe'\]"):
        odeint(Counting(), torch.ones(1, dtype=f64), T10, options=dict(max_nfe=5))


def test_solve_limits_reach_spec_options_of_this_thread_only():
    """``solve_limits`` adds max_nfe/stop to the options models build from their solver section,
    inside the block and in the calling thread only."""
    import threading

    from node_engine.solve_limits import solve_limits
    from node_engine.specs import SolverSection

    stop = lambda: False  # noqa: E731
    assert "max_nfe" not in SolverSection().solver_options()
    seen = {}
    with solve_limits(max_nfe=123, stop=stop):
        opts = SolverSection().solver_options()
        fixed = SolverSection(method="rk4", step_size=0.1).solver_options()
        th = threading.Thread(target=lambda: seen.update(SolverSection().solver_options()))
        th.start()
        th.join()
        with solve_limits(max_nfe=7):
            inner = SolverSection().solver_options()
    assert opts["max_nfe"] == 123 and opts["stop"] is stop and fixed["max_nfe"] == 123
    assert inner["max_nfe"] == 7 and inner["stop"] is stop
    assert "max_nfe" not in seen and "stop" not in seen
    assert "max_nfe" not in SolverSection().solver_options()
