"""Every failure is loud and named: solver errors, bad input, bad func output."""

import math

import pytest
import torch

from node_engine import MaxNumStepsError, NonFiniteStateError, SolverStats, StepSizeUnderflowError, odeint, odeint_adjoint
from node_engine.errors import SolverError

f64 = torch.float64
T01 = torch.tensor([0.0, 1.0], dtype=f64)


def test_step_size_underflow_at_blow_up():
    # y' = y², y(0) = 1 blows up at t = 1
    with pytest.raises(StepSizeUnderflowError) as ei:
        odeint(lambda t, y: y**2, torch.ones(1, dtype=f64), torch.tensor([0.0, 2.0], dtype=f64))
    assert isinstance(ei.value, SolverError)
    assert ei.value.t == pytest.approx(1.0, abs=1e-3)
    assert "t=" in str(ei.value)


def test_max_num_steps():
    with pytest.raises(MaxNumStepsError, match="max_num_steps=5"):
        odeint(lambda t, y: torch.cos(10 * t) * y, torch.ones(1, dtype=f64), torch.tensor([0.0, 10.0], dtype=f64),
               options=dict(max_num_steps=5))


def test_nonfinite_field_raises_with_time():
    def f(t, y):
        return y if t < 0.5 else y * float("nan")

    with pytest.raises(NonFiniteStateError) as ei:
        odeint(f, torch.ones(2, dtype=f64), T01)
    assert "NaN/inf" in str(ei.value)
    assert ei.value.t == pytest.approx(0.5, abs=1e-6)


def test_nonfinite_initial_state():
    with pytest.raises(NonFiniteStateError, match="NaN/inf"):
        odeint(lambda t, y: y, torch.tensor([1.0, float("inf")], dtype=f64), T01)


@pytest.mark.parametrize("options", [None, dict(first_step=0.1)])
@pytest.mark.parametrize("bad", ["y0", "f0"])
def test_nonfinite_start_names_its_source(bad, options):
    # without first_step the check rides on the initial step's norms; with it, it is explicit
    y0 = torch.tensor([1.0, float("nan") if bad == "y0" else 2.0], dtype=f64)

    def f(t, y):
        return y * float("inf") if bad == "f0" else y

    what = "initial state y0" if bad == "y0" else "derivative f(t0, y0)"
    with pytest.raises(NonFiniteStateError, match=what.replace("(", r"\(").replace(")", r"\)")):
        odeint(f, y0, T01, options=options)


def test_nonfinite_trial_step_is_rejected_and_shrunk():
    # y' = -sqrt(y): y = (1 - t/2)²; an oversized trial step makes y < 0 and sqrt NaN
    nans = []

    def f(t, y):
        out = -torch.sqrt(y)
        nans.append(bool(torch.isnan(out).any()))
        return out

    s = SolverStats()
    y = odeint(f, torch.ones(1, dtype=f64), torch.tensor([0.0, 1.5], dtype=f64), rtol=1e-8, atol=1e-10,
               options=dict(first_step=1.5), stats=s)
    assert any(nans) and s.steps_rejected >= 1
    assert float(y[-1, 0]) == pytest.approx(0.0625, rel=1e-6)


@pytest.mark.parametrize(
    "t, match",
    [
        (torch.zeros(2, 2, dtype=f64), "1-D"),
        (torch.tensor([0.0, 1.0, 0.5], dtype=f64), "strictly"),
        (torch.tensor([0.0, 1.0, 1.0], dtype=f64), "strictly"),
        (torch.tensor([0.0, float("nan")], dtype=f64), "NaN"),
        (torch.tensor([], dtype=f64), "1-D"),
    ],
)
def test_bad_t(t, match):
    with pytest.raises(ValueError, match=match):
        odeint(lambda t, y: y, torch.ones(1, dtype=f64), t)


def test_t_not_a_tensor():
    with pytest.raises(TypeError, match="t must be"):
        odeint(lambda t, y: y, torch.ones(1, dtype=f64), [0.0, 1.0])


def test_unknown_method_names_valid_ones():
    with pytest.raises(ValueError, match="dopri5") as ei:
        odeint(lambda t, y: y, torch.ones(1, dtype=f64), T01, method="rk45")
    assert "tsit5" in str(ei.value) and "euler" in str(ei.value)


def test_unknown_option_names_valid_ones():
    with pytest.raises(ValueError, match="first_step"):
        odeint(lambda t, y: y, torch.ones(1, dtype=f64), T01, options=dict(step_size=0.1))
    with pytest.raises(ValueError, match="step_size"):
        odeint(lambda t, y: y, torch.ones(1, dtype=f64), T01, method="rk4", options=dict(rtol=1))


def test_fixed_method_without_step_size_on_two_times_warns():
    # torchdiffeq steps on the output times (one step here) and so does odeint; #137: warn
    with pytest.warns(UserWarning, match="step_size"):
        odeint(lambda t, y: y, torch.ones(1, dtype=f64), T01, method="rk4")


@pytest.mark.parametrize(
    "func, exc, match",
    [
        (lambda t, y: torch.cat([y, y]), ValueError, "shape"),
        (lambda t, y: y.reshape(1, 2), ValueError, "shape"),
        (lambda t, y: y.long(), ValueError, "dtype"),  # a float32 derivative is cast (torchdiffeq does)
        (lambda t, y: 1.0, TypeError, "Tensor"),
    ],
)
def test_bad_func_output(func, exc, match):
    with pytest.raises(exc, match=match):
        odeint(func, torch.ones(2, dtype=f64), T01)


def test_bad_tuple_func_output():
    with pytest.raises(ValueError, match="tuple"):
        odeint(lambda t, s: s[0], (torch.ones(2, dtype=f64), torch.ones(3, dtype=f64)), T01)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rtol=-1.0), "rtol"),
        (dict(atol=float("nan")), "atol"),
        (dict(rtol=0.0, atol=0.0), "both be 0"),
        (dict(atol=torch.ones(3, dtype=f64)), "broadcast"),
        (dict(options=dict(max_num_steps=0)), "max_num_steps"),
        (dict(options=dict(first_step=0.0)), "first_step"),
        (dict(options=dict(safety=2.0)), "safety"),
    ],
)
def test_bad_tolerances_and_options(kw, match):
    with pytest.raises(ValueError, match=match):
        odeint(lambda t, y: y, torch.ones(2, dtype=f64), T01, **kw)


def test_bad_y0():
    with pytest.raises(TypeError, match="floating"):
        odeint(lambda t, y: y, torch.ones(2, dtype=torch.int64), T01)
    with pytest.raises(ValueError, match="dtype"):
        odeint(lambda t, s: s, (torch.ones(2, dtype=f64), torch.ones(2)), T01)


def test_adjoint_bad_mode_and_norm():
    f = torch.nn.Linear(2, 2).double()
    y0 = torch.ones(2, dtype=f64)
    with pytest.raises(ValueError, match="backsolve"):
        odeint_adjoint(lambda t, y: f(y), y0, T01, adjoint_mode="magic")
    with pytest.raises(ValueError, match="seminorm"):
        odeint_adjoint(lambda t, y: f(y), y0, T01, adjoint_options=dict(norm="l1"))
    with pytest.raises(ValueError, match="first_step"):
        odeint_adjoint(lambda t, y: f(y), y0, T01, adjoint_options=dict(bogus=1))


def test_underflow_message_is_not_math_error():
    # a huge negative rate: stiff, but the solver must finish or fail by name, never hang
    try:
        odeint(lambda t, y: -1e6 * (y - torch.cos(t)), torch.zeros(1, dtype=f64), T01,
               options=dict(max_num_steps=2000))
    except MaxNumStepsError as e:
        assert math.isfinite(e.t)
