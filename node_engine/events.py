"""Terminal events as in torchdiffeq: ``odeint(..., event_fn=...)`` and :func:`odeint_event`.

The solve runs from ``t[0]`` in the direction of ``t[1]`` (``t[1]`` only sets the direction and
the search window |t[1] − t[0]|; the solve goes on window after window until the event) and stops
at the first time τ where the event function changes sign from its value at t[0]. Search: each
window is solved to 32 evenly spaced outputs (the method's dense output) and the first sign change
is bracketed, then located by the Illinois method (regula falsi with halving) on short re-solves
from the bracket's lower end, to |Δτ| <= 1e-12·max(1, |τ|) (float64 times). A re-solve shorter
than 1e-10·max(1, |t|) is one Euler step (error ~1e-20·|y''|: an adaptive solve that short would
underflow its step size).

Several event functions (torchdiffeq's semantics): ``event_fn`` may return a tensor of any shape;
with s = sign(event_fn(t0, y0)) the search runs on c(t, y) = min(s · event_fn(t, y)), so the
event is the first time *any* component reaches zero. A component that is zero at t0 makes c(t0)
= 0: the event is t0 itself (as torchdiffeq's adaptive solvers; so is a scalar event_fn that is
zero at t0). A tuple ``y0`` (tensors of one dtype/device) is passed to ``event_fn`` and returned
as a tuple of (2, *S_i) tensors.

Gradients: y(τ) comes from a solve from t[0] to τ with the caller's solver (``odeint`` or
``odeint_adjoint``), and τ is differentiable by the implicit function theorem (Chen, Amos, Nickel,
"Learning Neural Event Functions for ODEs", ICLR 2021): with c(τ, y(τ)) = 0,
dτ = −(∂c/∂y dy + ∂c/∂θ dθ) / (∂c/∂t + ∂c/∂y · f(τ, y(τ))). With several event functions c is
the min above, whose derivative is the crossing component's. A ``t[0]`` that requires grad gets
dτ/dt0 too: y(τ) depends on t0 through the solve (``odeint``'s time gradients).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["solve_until_event", "odeint_event", "EventNotFoundError", "N_SEARCH", "MAX_WINDOWS"]

N_SEARCH = 32  # outputs per search window
MAX_WINDOWS = 1000
_MAX_ILLINOIS = 200
_EULER_SPAN = 1e-10  # relative span below which the state is advanced by one Euler step


class EventNotFoundError(RuntimeError):
    """No sign change of ``event_fn`` within MAX_WINDOWS search windows."""


def _sign(x) -> float:
    return math.copysign(1.0, float(x)) if float(x) != 0 else 0.0


def _members(y) -> tuple:
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _as_user(members: tuple, is_tuple: bool):
    return tuple(members) if is_tuple else members[0]


def _combined(event_fn, s0: torch.Tensor):
    """torchdiffeq's combination of several event functions: min(sign(c(t0, y0)) · c(t, y))."""

    def c(t, y):
        v = event_fn(t, y)
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"event_fn must return a tensor, got {type(v).__name__}")
        return (v * s0.to(v.dtype)).min() if v.numel() > 1 else v.reshape(()) * s0.to(v.dtype).reshape(())

    return c


class _EventTime(torch.autograd.Function):
    """(τ, y(τ)) with dL/dτ and the event's dependence on y and event_fn's parameters rerouted by the IFT.

    ``y(τ)`` comes member by member (``n`` tensors: one, or a tuple state's members), then the
    event function's parameters."""

    @staticmethod
    def forward(ctx, func, event_fn, is_tuple, n, t_event, *rest):
        ctx.func, ctx.event_fn, ctx.is_tuple, ctx.params = func, event_fn, is_tuple, rest[n:]
        ctx.save_for_backward(t_event, *rest[:n])
        return (t_event.clone(), *(m.clone() for m in rest[:n]))

    @staticmethod
    def backward(ctx, g_t, *g_ys):
        t_event, *ys = ctx.saved_tensors
        params = ctx.params
        with torch.enable_grad():
            t_ = t_event.detach().requires_grad_(True)
            y_ = [m.detach().requires_grad_(True) for m in ys]
            c = ctx.event_fn(t_, _as_user(y_, ctx.is_tuple))
            dc = torch.autograd.grad(c, (t_, *y_), allow_unused=True, retain_graph=bool(params))
        dcdt = torch.zeros_like(t_) if dc[0] is None else dc[0]
        dcdy = [torch.zeros_like(m) if d is None else d for m, d in zip(ys, dc[1:])]
        with torch.no_grad():
            f = _members(ctx.func(t_event.detach(), _as_user([m.detach() for m in ys], ctx.is_tuple)))
            f = [fi.to(m.dtype) for fi, m in zip(f, ys)]
        g_t = torch.zeros_like(t_event) if g_t is None else g_t
        g_ys = [torch.zeros_like(m) if g is None else g for m, g in zip(ys, g_ys)]
        total = g_t.double() + sum((g * fi).sum().double() for g, fi in zip(g_ys, f))
        dcdt_total = dcdt.double() + sum((d * fi).sum().double() for d, fi in zip(dcdy, f))
        factor = -total / dcdt_total
        gy = [g + factor.to(m.dtype) * d for g, d, m in zip(g_ys, dcdy, ys)]
        pg = ()
        if params:
            pg = torch.autograd.grad(c, params, factor.to(c.dtype), allow_unused=True)
        return (None, None, None, None, None, *gy, *pg)


def _params(event_fn) -> tuple:
    return tuple(p for p in (event_fn.parameters() if isinstance(event_fn, nn.Module) else ()) if p.requires_grad)


def _euler(func, t0: float, y, t1: float, t_dtype):
    """y + (t1 − t0)·f(t0, y), member by member (a tuple state stays a tuple); differentiable."""
    f = _members(func(torch.tensor(t0, dtype=t_dtype), y))
    out = tuple(m + (t1 - t0) * fi.to(m.dtype) for m, fi in zip(_members(y), f))
    return _as_user(out, isinstance(y, (tuple, list)))


def solve_until_event(solve, func, y0, t, event_fn, **kwargs):
    """(event_t, solution): the event time (0-d, t's dtype) and the states [y0, y(τ)].

    Args:
        solve: ``odeint`` or ``odeint_adjoint`` (its keyword arguments in ``kwargs``), which gives
            y(τ) and its gradients; func: as in ``odeint``; y0: (*S) tensor or tuple of tensors;
        t: (2,) start time and a second time giving the direction and search window;
        event_fn: ``(t, y) -> tensor`` of any shape (several event functions: the first to reach
            zero ends the solve); t is a 0-d tensor, y in y0's layout.
    Returns:
        event_t: 0-d, t's dtype (float64 for an integer t); solution: (2, *S) (a tuple of
        (2, *S_i) for a tuple y0), rows y0 and y(τ).
    Raises:
        ValueError: t without exactly two times or t[0] == t[1], an event_fn returning a non-tensor
        or an empty tensor; EventNotFoundError: no sign change in MAX_WINDOWS windows.
    """
    if not isinstance(t, torch.Tensor) or t.numel() != 2:
        raise ValueError(f"event handling needs t with exactly two times, got {getattr(t, 'shape', t)}")
    t0, t1 = float(t[0].detach()), float(t[1].detach())
    span = t1 - t0
    if span == 0:
        raise ValueError("t[0] == t[1]: no direction to search in")
    is_tuple = isinstance(y0, (tuple, list))
    y0 = _as_user(_members(y0), is_tuple)
    plain = {k: v for k, v in kwargs.items() if k in ("rtol", "atol", "method", "options")}
    from .odeint import odeint

    t_search = torch.float64
    y0d = _as_user(tuple(m.detach() for m in _members(y0)), is_tuple)
    with torch.no_grad():
        v0 = event_fn(torch.tensor(t0, dtype=t_search), y0d)
        if not isinstance(v0, torch.Tensor) or v0.numel() == 0:
            raise ValueError("event_fn must return a non-empty tensor (one value per event function)")
        s0_all = torch.sign(v0.detach())
    cfn = _combined(event_fn, s0_all)

    def g(tt: float, y) -> float:
        return float(cfn(torch.tensor(tt, dtype=t_search), y))

    def advance(ta: float, ya, tb: float):
        """y(tb) from (ta, ya), no autograd."""
        if abs(tb - ta) <= _EULER_SPAN * max(1.0, abs(ta)):
            return _euler(func, ta, ya, tb, t_search)
        out = odeint(func, ya, torch.tensor([ta, tb], dtype=torch.float64), **plain)
        return _as_user(tuple(o[-1] for o in _members(out)), is_tuple)

    with torch.no_grad():
        gs = g(t0, y0d)
        if gs == 0:  # a component is zero at t0 (torchdiffeq: the event is t0 itself)
            tau = t0
        else:
            tau = _search(func, y0d, t0, span, g, advance, odeint, plain, is_tuple)
    t_event = torch.tensor(tau, dtype=t.dtype if t.is_floating_point() else torch.float64, device=t.device)
    if tau == t0:
        y_end = _members(y0)
    elif abs(tau - t0) <= _EULER_SPAN * max(1.0, abs(t0)):
        y_end = _members(_euler(func, t0, y0, tau, t_event.dtype))
    else:
        t_start = t[0] if t.is_floating_point() else t[0].to(t_event.dtype)  # keeps t[0]'s gradient
        sol = solve(func, y0, torch.stack([t_start, t_event]), **kwargs)
        y_end = tuple(o[-1] for o in _members(sol))
    t_out, *y_out = _EventTime.apply(func, cfn, is_tuple, len(y_end), t_event, *y_end, *_params(event_fn))
    solution = tuple(torch.stack([m, e]) for m, e in zip(_members(y0), y_out))
    return t_out, _as_user(solution, is_tuple)


def _search(func, y0, t0: float, span: float, g, advance, odeint, plain, is_tuple) -> float:
    """The first τ after t0 (towards t0 + span) where g changes sign from g(t0) != 0."""
    ya, ta = y0, t0
    s0 = _sign(g(t0, y0))
    found = None
    for _ in range(MAX_WINDOWS):
        ts = torch.linspace(ta, ta + span, N_SEARCH + 1, dtype=torch.float64)
        out = _members(odeint(func, ya, ts, **plain))
        prev = (ta, ya)
        for j in range(1, N_SEARCH + 1):
            yj = _as_user(tuple(o[j] for o in out), is_tuple)
            gj = g(float(ts[j]), yj)
            if _sign(gj) != s0:
                found = (*prev, float(ts[j]), gj)
                break
            prev = (float(ts[j]), yj)
        if found:
            break
        ta, ya = prev
    if not found:
        raise EventNotFoundError(f"event_fn kept its sign over {MAX_WINDOWS} windows of length {abs(span):g}")
    lo, ylo, hi, fhi = found
    flo = g(lo, ylo)
    side = 0
    for _ in range(_MAX_ILLINOIS):
        if abs(hi - lo) <= 1e-12 * max(1.0, abs(hi)):
            break
        tau = hi - fhi * (hi - lo) / (fhi - flo) if fhi != flo else 0.5 * (lo + hi)
        if not (min(lo, hi) < tau < max(lo, hi)):
            tau = 0.5 * (lo + hi)
        y_tau = advance(lo, ylo, tau)
        ft = g(tau, y_tau)
        if ft == 0:
            return tau
        if _sign(ft) != s0:
            hi, fhi = tau, ft
            if side == 1:
                flo /= 2
            side = 1
        else:
            lo, ylo, flo = tau, y_tau, ft
            if side == -1:
                fhi /= 2
            side = -1
    return hi


def odeint_event(func, y0, t0, *, event_fn, reverse_time: bool = False, odeint_interface=None, **kwargs):
    """Solve from ``t0`` until ``event_fn(t, y)`` changes sign (torchdiffeq's ``odeint_event``).

    Args:
        func, y0: as in ``odeint`` (a tuple y0 too); t0: 0-d (or (1,)) start time; event_fn:
        ``(t, y) -> tensor`` (several values: the first to reach zero is the event);
        reverse_time: search towards smaller t; odeint_interface: ``node_engine.odeint`` (default)
        or ``node_engine.odeint_adjoint``; kwargs: its other keyword arguments.
    Returns:
        (event_t, solution): the 0-d event time (differentiable, implicit function theorem) and
        the (2, *y0.shape) states at t0 and at the event (a tuple of such for a tuple y0).
    Raises:
        as :func:`solve_until_event`.
    """
    from .odeint import odeint

    odeint_interface = odeint_interface or odeint
    t0 = torch.as_tensor(t0).reshape(-1)[:1]
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
