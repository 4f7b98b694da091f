"""Terminal events as in torchdiffeq: ``odeint(..., event_fn=...)`` and :func:`odeint_event`.

The solve runs from ``t[0]`` in the direction of ``t[1]`` (``t[1]`` only sets the direction and
the search window |t[1] − t[0]|; the solve goes on window after window until the event) and stops
at the first time τ where ``event_fn(τ, y(τ))`` changes sign from its value at t[0]. Search: each
window is solved to 32 evenly spaced outputs (the method's dense output) and the first sign change
is bracketed, then located by the Illinois method (regula falsi with halving) on short re-solves
from the bracket's start, to |Δτ| <= 1e-12·max(1, |τ|) (float64 times).

Gradients: y(τ) comes from a solve from t[0] to τ with the caller's solver (``odeint`` or
``odeint_adjoint``), and τ is differentiable by the implicit function theorem (Chen, Amos, Nickel,
"Learning Neural Event Functions for ODEs", ICLR 2021): with c(τ, y(τ)) = 0,
dτ = −(∂c/∂y dy + ∂c/∂θ dθ) / (∂c/∂t + ∂c/∂y · f(τ, y(τ))).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["solve_until_event", "odeint_event", "EventNotFoundError", "N_SEARCH", "MAX_WINDOWS"]

N_SEARCH = 32  # outputs per search window
MAX_WINDOWS = 1000
_MAX_ILLINOIS = 200


class EventNotFoundError(RuntimeError):
    """No sign change of ``event_fn`` within MAX_WINDOWS search windows."""


def _sign(x) -> float:
    return math.copysign(1.0, float(x)) if float(x) != 0 else 0.0


class _EventTime(torch.autograd.Function):
    """(τ, y(τ)) with dL/dτ and the event's dependence on y and event_fn's parameters rerouted by the IFT."""

    @staticmethod
    def forward(ctx, func, event_fn, t_event, y_event, *params):
        ctx.func, ctx.event_fn = func, event_fn
        ctx.save_for_backward(t_event, y_event)
        return t_event.clone(), y_event.clone()

    @staticmethod
    def backward(ctx, g_t, g_y):
        t_event, y_event = ctx.saved_tensors
        params = tuple(p for p in (ctx.event_fn.parameters() if isinstance(ctx.event_fn, nn.Module) else ())
                       if p.requires_grad)
        with torch.enable_grad():
            t_ = t_event.detach().requires_grad_(True)
            y_ = y_event.detach().requires_grad_(True)
            c = ctx.event_fn(t_, y_)
            dc = torch.autograd.grad(c, (t_, y_), allow_unused=True, retain_graph=True)
        dcdt = torch.zeros_like(t_) if dc[0] is None else dc[0]
        dcdy = torch.zeros_like(y_) if dc[1] is None else dc[1]
        with torch.no_grad():
            f = ctx.func(t_event.detach().to(y_event.dtype), y_event.detach()).to(y_event.dtype)
        g_t = torch.zeros_like(t_event) if g_t is None else g_t
        g_y = torch.zeros_like(y_event) if g_y is None else g_y
        total = g_t.double() + (g_y * f).sum().double()
        dcdt_total = dcdt.double() + (dcdy * f).sum().double()
        factor = -total / dcdt_total
        gy = g_y + (factor.to(y_event.dtype) * dcdy)
        pg = ()
        if params:
            pg = torch.autograd.grad(c, params, factor.to(c.dtype), allow_unused=True)
        return (None, None, None, gy, *pg)


def solve_until_event(solve, func, y0, t, event_fn, **kwargs):
    """(event_t, solution): the event time (0-d, t's dtype) and (2, *y0.shape) states [y0, y(τ)].

    ``solve`` is ``odeint`` or ``odeint_adjoint`` (its keyword arguments in ``kwargs``).
    Raises ValueError: t without exactly two times, a tuple y0, a non-scalar event_fn value;
    EventNotFoundError: no sign change in MAX_WINDOWS windows.
    """
    if not isinstance(y0, torch.Tensor):
        raise ValueError("event handling needs a tensor y0 (not a tuple)")
    if not isinstance(t, torch.Tensor) or t.numel() != 2:
        raise ValueError(f"event handling needs t with exactly two times, got {getattr(t, 'shape', t)}")
    t0, t1 = float(t[0]), float(t[1])
    span = t1 - t0
    if span == 0:
        raise ValueError("t[0] == t[1]: no direction to search in")
    plain = {k: v for k, v in kwargs.items() if k in ("rtol", "atol", "method", "options")}
    from .odeint import odeint

    def g(tt: float, y) -> float:
        v = event_fn(torch.tensor(tt, dtype=torch.float64), y)
        if v.numel() != 1:
            raise ValueError("event_fn must return one value (a 0-d tensor)")
        return float(v)

    with torch.no_grad():
        ya, ta = y0.detach(), t0
        s0 = _sign(g(t0, ya))
        found = None
        for _ in range(MAX_WINDOWS):
            ts = torch.linspace(ta, ta + span, N_SEARCH + 1, dtype=torch.float64)
            out = odeint(func, ya, ts, **plain)
            for j in range(1, N_SEARCH + 1):
                gj = g(float(ts[j]), out[j])
                if _sign(gj) != s0:
                    found = (float(ts[j - 1]), out[j - 1], float(ts[j]), gj)
                    break
            if found:
                break
            ta, ya = float(ts[-1]), out[-1]
        if not found:
            raise EventNotFoundError(f"event_fn kept its sign over {MAX_WINDOWS} windows of length {abs(span):g}")
        tb, yb, hi, fhi = found
        lo, flo = tb, g(tb, yb)
        tau = hi
        side = 0
        for _ in range(_MAX_ILLINOIS):
            if abs(hi - lo) <= 1e-12 * max(1.0, abs(hi)):
                break
            tau = hi - fhi * (hi - lo) / (fhi - flo) if fhi != flo else 0.5 * (lo + hi)
            if not (min(lo, hi) < tau < max(lo, hi)):
                tau = 0.5 * (lo + hi)
            ft = g(tau, odeint(func, yb, torch.tensor([tb, tau], dtype=torch.float64), **plain)[-1])
            if ft == 0:
                lo = hi = tau
                break
            if _sign(ft) != s0:
                hi, fhi = tau, ft
                if side == 1:
                    flo /= 2
                side = 1
            else:
                lo, flo = tau, ft
                if side == -1:
                    fhi /= 2
                side = -1
        tau = hi
    t_event = torch.tensor(tau, dtype=t.dtype if t.is_floating_point() else torch.float64, device=t.device)
    sol = solve(func, y0, torch.stack([t[0].detach(), t_event]).to(t.dtype), **kwargs)
    params = tuple(p for p in (event_fn.parameters() if isinstance(event_fn, nn.Module) else ()) if p.requires_grad)
    t_out, y_out = _EventTime.apply(func, event_fn, t_event, sol[-1], *params)
    return t_out, torch.stack([sol[0], y_out])


def odeint_event(func, y0, t0, *, event_fn, reverse_time: bool = False, odeint_interface=None, **kwargs):
    """Solve from ``t0`` until ``event_fn(t, y)`` changes sign (torchdiffeq's ``odeint_event``).

    Args:
        func, y0: as in ``odeint``; t0: 0-d (or (1,)) start time; event_fn: ``(t, y) -> 0-d``;
        reverse_time: search towards smaller t; odeint_interface: ``node_engine.odeint`` (default)
        or ``node_engine.odeint_adjoint``; kwargs: its other keyword arguments.
    Returns:
        (event_t, solution): the 0-d event time (differentiable, implicit function theorem) and
        the (2, *y0.shape) states at t0 and at the event.
    """
    from .odeint import odeint

    odeint_interface = odeint_interface or odeint
    t0 = torch.as_tensor(t0).reshape(-1)[:1]
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
