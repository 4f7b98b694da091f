"""Terminal events (issue 16): several event functions, tuple states, events at t0 and on a search
window's end, with and without the adjoint. Right values are analytic."""

import math

import pytest
import torch

from node_engine import odeint, odeint_adjoint, odeint_event

f64 = torch.float64
G = 9.81
TIGHT = dict(rtol=1e-11, atol=1e-12)


def _solve(adjoint):
    return odeint_adjoint if adjoint else odeint


@pytest.mark.parametrize("adjoint", [False, True])
def test_ball_under_gravity_tuple_state_hits_the_ground(adjoint):
    # (h, v)' = (v, −g): h = h0 + v0 t − g t²/2 = 0 at τ = (v0 + √(v0² + 2 g h0)) / g;
    # dτ/dh0 = 1/√(v0² + 2 g h0), dτ/dv0 = (1 + v0/√(v0² + 2 g h0)) / g
    h0 = torch.tensor([10.0], dtype=f64, requires_grad=True)
    v0 = torch.tensor([2.0], dtype=f64, requires_grad=True)
    seen = []

    def event_fn(t, y):
        seen.append(type(y))
        return y[0].sum()

    te, (h, v) = _solve(adjoint)(lambda t, y: (y[1], torch.full_like(y[0], -G)), (h0, v0),
                                 torch.tensor([0.0, 1.0], dtype=f64), event_fn=event_fn)
    root = math.sqrt(4.0 + 2 * G * 10.0)
    tau = (2.0 + root) / G
    assert seen and all(s is tuple for s in seen)
    assert h.shape == v.shape == (2, 1)
    assert float(te.detach()) == pytest.approx(tau, rel=1e-9)
    assert float(h[-1, 0].detach()) == pytest.approx(0.0, abs=1e-9)
    assert float(v[-1, 0].detach()) == pytest.approx(2.0 - G * tau, rel=1e-9)
    te.backward()
    assert float(h0.grad) == pytest.approx(1 / root, rel=1e-6)
    assert float(v0.grad) == pytest.approx((1 + 2.0 / root) / G, rel=1e-6)


@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("order", [(2.0, 3.0), (3.0, 2.0)])
def test_several_event_functions_the_first_to_cross_wins(adjoint, order):
    # y' = y, y(0) = y0: y = 2 at ln(2/y0) comes before y = 3, whichever output holds it;
    # dτ/dy0 = −1/y0; the state at the event is 2 whatever y0 (dy(τ)/dy0 = 0)
    y0 = torch.tensor([1.0], dtype=f64, requires_grad=True)
    a, b = order
    te, sol = _solve(adjoint)(lambda t, y: y, y0, torch.tensor([0.0, 1.0], dtype=f64),
                              event_fn=lambda t, y: torch.cat([y - a, y - b]), **TIGHT)
    assert float(te.detach()) == pytest.approx(math.log(2.0), rel=1e-9)
    assert float(sol[-1, 0].detach()) == pytest.approx(2.0, rel=1e-9)
    te.backward(retain_graph=True)
    assert float(y0.grad) == pytest.approx(-1.0, rel=1e-6)
    y0.grad = None
    sol[-1, 0].backward()
    assert float(y0.grad) == pytest.approx(0.0, abs=1e-6)


def test_event_functions_with_mixed_initial_signs():
    # 3 − y starts positive, y − 2 negative; each is compared with its own initial sign (torchdiffeq)
    te, _ = odeint(lambda t, y: y, torch.ones(1, dtype=f64), torch.tensor([0.0, 1.0], dtype=f64),
                   event_fn=lambda t, y: torch.stack([3 - y[0], y[0] - 2]), **TIGHT)
    assert float(te.detach()) == pytest.approx(math.log(2.0), rel=1e-9)


@pytest.mark.parametrize("adjoint", [False, True])
def test_event_parameters_get_the_event_time_gradient(adjoint):
    # y' = y, y(0) = 1, event y = θ (a module parameter): τ = ln θ, dτ/dθ = 1/θ
    class Threshold(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.tensor([2.5, 4.0], dtype=f64))

        def forward(self, t, y):
            return y - self.theta

    ev = Threshold()
    te, _ = odeint_event(lambda t, y: y, torch.ones(1, dtype=f64), torch.tensor(0.0, dtype=f64), event_fn=ev,
                         odeint_interface=_solve(adjoint), **TIGHT)
    te.backward()
    assert float(te.detach()) == pytest.approx(math.log(2.5), rel=1e-9)
    assert ev.theta.grad.tolist() == pytest.approx([1 / 2.5, 0.0], abs=1e-7)


def test_a_component_zero_at_t0_is_an_event_at_t0():
    te, sol = odeint(lambda t, y: y, torch.ones(1, dtype=f64), torch.tensor([0.5, 1.5], dtype=f64),
                     event_fn=lambda t, y: torch.cat([y - 1, y - 3]))
    assert float(te.detach()) == 0.5 and sol[-1].tolist() == [1.0]


def test_event_on_a_search_window_end():
    # the event at t0 + 2·|t1 − t0| (a window's end, where round-off can leave the sign unchanged):
    # regula falsi's first estimate lands ulps past the bracket start, a span too short for an
    # adaptive solve (torchdiffeq's event_tests "constant" case: StepSizeUnderflowError before)
    ts = torch.linspace(1, 8, 10, dtype=f64)
    te, sol = odeint(lambda t, y: 0.2 + (y - (0.2 * t + 3.0)) ** 5, torch.tensor(3.2, dtype=f64), ts[:2],
                     event_fn=lambda t, y: y - (0.2 * ts[2] + 3.0))
    assert float(te.detach()) == pytest.approx(float(ts[2]), abs=1e-12)
    assert float(sol[-1]) == pytest.approx(0.2 * float(ts[2]) + 3.0, abs=1e-12)


@pytest.mark.parametrize("adjoint", [False, True])
def test_event_time_gradient_reaches_the_start_time(adjoint):
    # y' = t, y(t0) = 0: y = (t² − t0²)/2 = 1 at τ = √(2 + t0²), dτ/dt0 = t0/τ
    t0 = torch.tensor(0.5, dtype=f64, requires_grad=True)
    te, _ = odeint_event(lambda t, y: t * torch.ones_like(y), torch.zeros(1, dtype=f64), t0,
                         event_fn=lambda t, y: y.sum() - 1, odeint_interface=_solve(adjoint), **TIGHT)
    tau = (2 + 0.25) ** 0.5
    assert float(te.detach()) == pytest.approx(tau, rel=1e-9)
    te.backward()
    assert float(t0.grad) == pytest.approx(0.5 / tau, rel=1e-6)
