"""Per-row solve status: a failing row fails alone (``raise_on_failure=False``) or raises its named
error (default). References are closed forms."""

import math

import pytest
import torch

from node_engine import (MaxNumStepsError, NFEBudgetExceeded, NonFiniteStateError, SolverStats, SolveStatus, StepSizeUnderflowError,
                         odeint)

from .problems import ADAPTIVE_METHODS

f64 = torch.float64
PS = dict(step_control="per_sample")
QUIET = dict(step_control="per_sample", raise_on_failure=False)


def blowup(t, y):
    """y' = y²: y = y0 / (1 - y0 t), finite until t = 1/y0 (then the step size underflows)."""
    return y * y


def test_status_enum_maps_to_the_named_errors():
    assert [int(s) for s in SolveStatus] == [0, 1, 2, 3, 4]
    assert SolveStatus.SUCCESS.error is None
    assert SolveStatus.MAX_NUM_STEPS.error is MaxNumStepsError
    assert SolveStatus.STEP_UNDERFLOW.error is StepSizeUnderflowError
    assert SolveStatus.NON_FINITE.error is NonFiniteStateError
    assert SolveStatus.NFE_BUDGET.error is NFEBudgetExceeded


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_exploding_row_fails_alone(method):
    """Row 1 (y0 = 2) blows up at t = 0.5 < 1; rows 0 and 2 stay finite and match the closed form;
    row 1 has its outputs up to the blow-up and NaN after it."""
    y0 = torch.tensor([[0.5], [2.0], [-1.0]], dtype=f64)
    t = torch.tensor([0.0, 0.25, 0.75, 1.0], dtype=f64)
    stats = SolverStats()
    y = odeint(blowup, y0, t, rtol=1e-8, atol=1e-10, method=method, options=QUIET, stats=stats)
    assert stats.status.dtype == torch.int64 and stats.status.device.type == "cpu"
    assert stats.status.tolist() == [SolveStatus.SUCCESS, SolveStatus.STEP_UNDERFLOW, SolveStatus.SUCCESS]
    exact = y0[None] / (1 - y0[None] * t[:, None, None])
    ok = [0, 2]
    torch.testing.assert_close(y[:, ok], exact[:, ok], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(y[:2, 1], exact[:2, 1], rtol=1e-6, atol=1e-8)
    assert torch.isnan(y[2:, 1]).all()
    # the easy rows' answers are those they get alone (the failure changed nothing for them)
    for b in ok:
        alone = odeint(blowup, y0[b:b + 1], t, rtol=1e-8, atol=1e-10, method=method, options=PS)
        torch.testing.assert_close(alone[:, 0], y[:, b], rtol=0, atol=0)


def test_exploding_row_raises_the_named_error_by_default():
    y0 = torch.tensor([[0.5], [2.0], [-1.0]], dtype=f64)
    stats = SolverStats()
    with pytest.raises(StepSizeUnderflowError, match="sample 1") as ei:
        odeint(blowup, y0, torch.tensor([0.0, 1.0], dtype=f64), options=PS, stats=stats)
    assert ei.value.t == pytest.approx(0.5, abs=1e-3)
    assert stats.status[1] == SolveStatus.STEP_UNDERFLOW


def test_max_num_steps_fails_only_the_row_that_needs_more():
    """y' = i ω cos(ω t)-style oscillation y' = -ω² ... as a first-order pair: row 1 has ω = 60 and
    needs far more steps than the 60 allowed; row 0 (ω = 1) finishes in a few."""
    omega = torch.tensor([1.0, 60.0], dtype=f64)

    def osc(t, s):
        y, w = s
        return torch.stack([y[:, 1] * w, -y[:, 0] * w], 1), torch.zeros_like(w)

    y0 = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=f64)
    t = torch.tensor([0.0, 2.0], dtype=f64)
    stats = SolverStats()
    y, _ = odeint(osc, (y0, omega), t, rtol=1e-8, atol=1e-8,
                  options=dict(QUIET, max_num_steps=60), stats=stats)
    assert stats.status.tolist() == [SolveStatus.SUCCESS, SolveStatus.MAX_NUM_STEPS]
    assert abs(float(y[-1, 0, 0]) - math.sin(2.0)) < 1e-6
    assert torch.isnan(y[-1, 1]).all()
    with pytest.raises(MaxNumStepsError, match="sample 1"):
        odeint(osc, (y0, omega), t, rtol=1e-8, atol=1e-8, options=dict(PS, max_num_steps=60))


def test_non_finite_row_and_non_finite_start():
    """Row 0's field is NaN beyond t = 0.3 (for every step size; the row is marked by a flag carried
    in the state); row 1's y0 is NaN; row 2 is fine."""

    def f(t, s):
        y, flag = s
        return torch.where(((t > 0.3) & (flag > 0))[:, None], float("nan"), -y), torch.zeros_like(flag)

    y0 = torch.tensor([[1.0], [float("nan")], [2.0]], dtype=f64)
    flag = torch.tensor([1.0, 0.0, 0.0], dtype=f64)
    stats = SolverStats()
    t = torch.tensor([0.0, 0.2, 1.0], dtype=f64)
    y, _ = odeint(f, (y0, flag), t, options=QUIET, stats=stats)
    assert stats.status.tolist() == [SolveStatus.NON_FINITE, SolveStatus.NON_FINITE, SolveStatus.SUCCESS]
    torch.testing.assert_close(y[:, 2, 0], 2 * torch.exp(-t), rtol=1e-6, atol=1e-8)
    assert float(y[1, 0, 0]) == pytest.approx(math.exp(-0.2), rel=1e-6)
    assert torch.isnan(y[2, 0]).all() and torch.isnan(y[1:, 1]).all()
    with pytest.raises(NonFiniteStateError, match="initial state y0 of sample 1"):
        odeint(f, (y0, flag), t, options=PS)
    with pytest.raises(NonFiniteStateError, match="sample 0"):
        odeint(f, (y0[[0, 2]], flag[[0, 2]]), t, options=PS)


def test_joint_status_is_one_row():
    """Joint step control: the whole state is one row, so stats.status has shape (1,) and a failure
    leaves every output after it NaN."""
    stats = SolverStats()
    y0 = torch.tensor([0.5, 2.0], dtype=f64)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=f64)
    y = odeint(blowup, y0, t, options=dict(raise_on_failure=False), stats=stats)
    assert stats.status.tolist() == [SolveStatus.STEP_UNDERFLOW]
    torch.testing.assert_close(y[1], y0 / (1 - 0.25 * y0), rtol=1e-6, atol=1e-8)
    assert torch.isnan(y[2]).all()
    odeint(lambda t, y: -y, y0, t, stats=stats)
    assert stats.status.tolist() == [SolveStatus.SUCCESS]
    with pytest.raises(StepSizeUnderflowError):
        odeint(blowup, y0, t, stats=stats)
    assert stats.status.tolist() == [SolveStatus.STEP_UNDERFLOW]


def test_raise_on_failure_must_be_a_bool_and_adaptive():
    y0 = torch.ones(2, 1, dtype=f64)
    t = torch.tensor([0.0, 1.0], dtype=f64)
    with pytest.raises(ValueError, match="raise_on_failure"):
        odeint(lambda t, y: -y, y0, t, options=dict(raise_on_failure="no"))
    with pytest.raises(ValueError, match="raise_on_failure"):
        odeint(lambda t, y: -y, y0, t, method="rk4", options=dict(step_size=0.1, raise_on_failure=False))
