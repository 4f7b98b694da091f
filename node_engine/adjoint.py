"""``odeint_adjoint``: gradients of ODE solutions by the adjoint method.

Two modes:

- ``"backsolve"`` (default; Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential
  Equations", NeurIPS 2018, eq. (4) and Appendix B, Algorithm 2): the forward solve keeps only
  the outputs; the backward pass integrates the augmented system
  ``[y, a, a_θ]' = [f, -aᵀ ∂f/∂y, -aᵀ ∂f/∂θ]`` from each output time to the previous one, adding
  the loss gradient at every output time. Saved memory O(T·N), independent of the number of
  steps. Its gradient is that of the continuous problem, up to the backward solve's error, and
  re-integrating y backwards is unstable where the forward flow contracts strongly.
- ``"checkpoint"`` (Adaptive Checkpoint Adjoint; Zhuang et al., ICML 2020): the forward solve
  keeps the state at the start of every accepted step; backwards, each step's graph (its stages
  and the dense output at output times inside it) is rebuilt from that state and backpropagated.
  This is the exact gradient of the discrete solve, memory O(steps·N), no stored activations.

``adjoint_options=dict(norm="seminorm")`` leaves the parameter adjoint a_θ out of the backward
step-size norm (Kidger, Chen, Lyons, "'Hey, that's not an ODE': Faster ODE Adjoints via
Seminorms", ICML 2021): a_θ never feeds back into the dynamics, so its error need not be controlled.
With the forward's method and tolerances (the default), the backward solve's first step is the
step the forward controller proposed last, not Hairer's initial step: the backward retraces the
forward trajectory, so this saves about one step per solve with the same error control.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .errors import NFEBudgetExceeded
from .odeint import SolverConfig, add_info, check_t, is_per_sample, make_config, odeint, time_dtype
from .solvers.hooks import find_callbacks
from .solvers.adaptive import SolveInfo, StepRecord, budget_message, check_stop, over_budget
from .solvers.rk import RKStepper
from .solvers.esdirk import ESDIRKStepper, adjoint_newton_factor
from .solvers import ADAPTIVE, IMPLICIT, METHODS, STIFF
from .solvers.adams import ADAMS_METHODS
from .solvers.state import StateLayout, VectorField
from .stats import SolverStats

__all__ = ["odeint_adjoint"]

ADJOINT_MODES = ("backsolve", "checkpoint")
NORMS = ("default", "seminorm")


class _AugmentedField:
    """The backsolve adjoint system on a flat [y (N), a (N), a_θ (P)] vector (Chen et al. eq. 4).

    A ``func`` with a non-None attribute ``adjoint_vjp(t, y, v, params) -> (f, vᵀ∂f/∂y,
    [vᵀ∂f/∂p for p in params])`` (y, v and the returned f and vᵀ∂f/∂y in ``func``'s own layout:
    a tensor or a tuple; a None entry means zero) supplies the VJP itself; otherwise autograd
    computes it. The CNF's fused exact-trace dynamics do, saving the autograd graph per evaluation.
    """

    def __init__(self, vf: VectorField, n: int, params: tuple[torch.Tensor, ...]):
        self.vf = vf
        self.n = n
        self.params = params
        self.t_dtype = vf.t_dtype
        self.work_shape = torch.Size((2 * n + sum(p.numel() for p in params),))
        self.direct = getattr(vf.func, "adjoint_vjp", None)
        self.compile_key = (n, tuple(p.shape for p in params))  # with vf.func's: which compiled step fits

    def _direct(self, t: float, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        vf = self.vf
        vf.nfe += 1
        tt = t if type(t) is torch.Tensor else torch.scalar_tensor(t, dtype=vf.t_dtype, device=y.device)
        return self._direct_flat(tt, y, a)

    def _direct_flat(self, tt: torch.Tensor, y: torch.Tensor, a: torch.Tensor, direct=None, params=None):
        lay = self.vf.layout
        ys = lay.unflatten(y)
        direct = self.direct if direct is None else direct
        params = self.params if params is None else params
        f, g_y, g_p = direct(tt, ys, lay.unflatten(-a), params)
        members = (lambda x: x) if lay.is_tuple else (lambda x: (x,))
        parts = [x.reshape(-1) for x in members(f)]
        parts += [torch.zeros_like(m).reshape(-1) if g is None else g.reshape(-1)
                  for g, m in zip(members(g_y), members(ys))]
        parts += [torch.zeros(p.numel(), dtype=y.dtype, device=y.device) if g is None else g.reshape(-1)
                  for g, p in zip(g_p, params)]
        return torch.cat(parts)

    def newton_factor(self, t: float, z: torch.Tensor, hg: float):
        """The Newton solve an implicit (ESDIRK) step of this system uses: block diagonal, from the
        forward field's Jacobian only (:func:`~.solvers.esdirk.adjoint_newton_factor`)."""
        return adjoint_newton_factor(self.vf, self.n, t, z, hg)

    @property
    def nfe(self) -> int:
        """Evaluations so far (of the wrapped field: the solver checks ``max_nfe`` against it)."""
        return self.vf.nfe

    @nfe.setter
    def nfe(self, value: int) -> None:  # a compiled step counts its stages here
        self.vf.nfe = value

    @property
    def func(self):
        """The user's field (the compiled step's cache key)."""
        return self.vf.func

    def pure(self):
        """The augmented field as a pure function (t 0-d, z flat) for the compiled step
        (options["compile"]); only with ``adjoint_vjp`` (autograd.grad does not trace): else None."""
        if self.direct is None:
            return None
        n, shell = self.n, _AugmentedField(_Shell(self.vf), self.n, ())  # layout only: no tensors held

        def g(arg, t, z):
            func, params = arg
            return shell._direct_flat(t, z[:n], z[n: 2 * n], func.adjoint_vjp, params)
        return g, (self.vf.func, self.params)

    def at(self, t: float, z: torch.Tensor) -> torch.Tensor:
        """The solver's call with a host time (the work shape is already flat)."""
        return self(t, z)

    def __call__(self, t: float, z: torch.Tensor) -> torch.Tensor:
        n = self.n
        y, a = z[:n], z[n : 2 * n]
        if self.direct is not None:
            return self._direct(t, y, a)
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            f = self.vf(t, y_.view(self.vf.work_shape)).reshape(-1)
            inputs = (y_,) + self.params
            if f.requires_grad:
                grads = torch.autograd.grad(f, inputs, -a, allow_unused=True)
            else:
                grads = (None,) * len(inputs)
        parts = [f.detach()]
        parts.extend(
            torch.zeros(x.numel(), dtype=z.dtype, device=z.device) if g is None else g.reshape(-1)
            for g, x in zip(grads, inputs)
        )
        return torch.cat(parts)


class _Shell:
    """A field wrapper's layout without its field (what the compiled step's pure function keeps)."""

    def __init__(self, vf: VectorField):
        self.layout, self.t_dtype, self.work_shape, self.func = vf.layout, vf.t_dtype, vf.work_shape, None


class _Run:
    """Everything the autograd Function needs that is not a tensor input."""

    def __init__(self, func, layout, times, t_dtype, cfg, adj_cfg, mode, params, stats):
        self.func = func
        self.layout = layout
        self.times = times
        self.t_dtype = t_dtype
        self.cfg: SolverConfig = cfg
        self.adj_cfg: SolverConfig | None = adj_cfg
        self.mode = mode
        self.params = params
        self.stats = stats
        self.record: StepRecord | None = None
        self.warm_start = False  # backsolve: first backward step = the forward's last proposal
        self.next_step = math.nan


class _OdeintAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, t: torch.Tensor, z0: torch.Tensor, *params: torch.Tensor):
        vf = VectorField(run.func, run.layout, run.t_dtype)
        info = SolveInfo()
        record = StepRecord() if run.mode == "checkpoint" else None
        try:
            out = run.cfg.solve(vf, z0.detach(), run.times, info, record=record, grad=False)
        finally:
            add_info(run.stats, info, vf, times=run.times)
        run.next_step = info.next_step
        ctx.run = run
        if record is not None:
            starts = torch.stack(record.starts) if record.starts else z0.new_empty(0, z0.numel())
            record.starts = []
            run.record = record
            ctx.save_for_backward(out, t, starts)
        else:
            ctx.save_for_backward(out, t)
        return out

    @staticmethod
    def backward(ctx, g_out: torch.Tensor):
        run: _Run = ctx.run
        saved = ctx.saved_tensors
        out, t = saved[0], saved[1]
        params = run.params
        vf = VectorField(run.func, run.layout, run.t_dtype)
        info = SolveInfo()
        g_out = g_out.detach()
        try:
            if run.mode == "backsolve":
                a_before_g0, a, p_grads = _backsolve(run, vf, out, g_out, info)
            else:
                a_before_g0, a, p_grads = _checkpoint_backward(run, vf, saved[2], g_out, info)
            t_grad = None
            if ctx.needs_input_grad[1]:
                t_grad = _time_gradient(run, vf, out, g_out, a_before_g0, t)
        finally:
            add_info(run.stats, info, vf, backward=True)
        return (None, t_grad, a, *p_grads)


def _backsolve(run: _Run, vf: VectorField, out, g_out, info):
    T, N = out.shape
    params = run.params
    P = sum(p.numel() for p in params)
    aug = _AugmentedField(vf, N, params)
    # With one output time there is nothing to integrate: the adjoint is just g_out[0], added below.
    a = g_out[-1].clone() if T > 1 else torch.zeros_like(g_out[0])
    p_adj = out.new_zeros(P)
    times = run.times
    # The backward solve retraces the forward trajectory, so it starts with the step the forward
    # controller proposed last (and each later interval with the backward's own last proposal)
    # instead of Hairer's cautious initial step: one step fewer per interval, same error control.
    h = run.next_step if run.warm_start else math.nan
    for i in range(T - 1, 0, -1):
        z = torch.cat([out[i], a, p_adj])
        cfg = run.adj_cfg
        if h > 0 and math.isfinite(h):
            cfg = dataclasses.replace(cfg, options={**cfg.options, "first_step": min(h, abs(times[i] - times[i - 1]))})
        res = cfg.solve(aug, z, [times[i], times[i - 1]], info, grad=False)
        h = info.next_step if run.warm_start else math.nan
        a = res[1, N : 2 * N]
        p_adj = res[1, 2 * N :]
        if i > 1:
            a = a + g_out[i - 1]
    a_before = a
    a = a + g_out[0]
    p_grads = []
    off = 0
    for p in params:
        p_grads.append(p_adj[off : off + p.numel()].view_as(p).to(p.dtype))
        off += p.numel()
    return a_before, a, p_grads


def _checkpoint_backward(run: _Run, vf: VectorField, starts, g_out, info):
    rec = run.record
    T, N = g_out.shape
    params = run.params
    n_steps = starts.shape[0]
    cfg = run.cfg
    tab = STIFF.get(cfg.method) or METHODS[cfg.method]
    dense_at: dict[int, list[tuple[int, float]]] = {}
    end_at: dict[int, list[int]] = {}
    for i, (n, th) in enumerate(rec.outputs, start=1):
        if th is None:
            end_at.setdefault(n, []).append(i)
        else:
            dense_at.setdefault(n, []).append((i, th))
    a = torch.zeros(N, dtype=g_out.dtype, device=g_out.device)
    p_acc = [torch.zeros_like(p) for p in params]
    stop, max_nfe = run.cfg.options.get("stop"), run.cfg.options.get("max_nfe")
    for n in range(n_steps - 1, -1, -1):
        check_stop(stop, rec.bounds[n + 1])
        if over_budget(vf, max_nfe):
            raise NFEBudgetExceeded(budget_message(vf, max_nfe, rec.bounds[n + 1], " (checkpoint adjoint)"),
                                    t=rec.bounds[n + 1])
        for i in end_at.get(n, ()):
            a = a + g_out[i]
        dense = dense_at.get(n, [])
        t0, t1 = rec.bounds[n], rec.bounds[n + 1]
        with torch.enable_grad():
            z = starts[n].detach().requires_grad_(True)
            if cfg.method in STIFF:  # replayed stages: Newton again, then its implicit-function derivative
                stepper = ESDIRKStepper(tab, vf.work_shape, z.device, z.dtype, cfg.rtol, cfg.atol,
                                        newton_tol=cfg.options.get("newton_tol"),
                                        newton_max_iters=cfg.options.get("newton_max_iters"))
            else:
                stepper = RKStepper(tab, vf.work_shape, z.device, z.dtype, reuse_buffer=False)
            k1 = vf(rec.k1_time[n], z.view(vf.work_shape))
            z_new = stepper.step(vf, t0, t1, rec.eval_end[n], z, k1)
            outs, gs = [z_new], [a]
            if dense:
                outs.append(stepper.dense(vf, t0, t1, z, [th for _, th in dense]))
                gs.append(g_out[[i for i, _ in dense]])
            grads = torch.autograd.grad(outs, (z,) + params, gs, allow_unused=True)
        info.accepted += 1
        info.last_step = abs(t1 - t0)
        a = grads[0] if grads[0] is not None else torch.zeros_like(a)
        for k, g in enumerate(grads[1:]):
            if g is not None:
                p_acc[k] += g
    a_before = a
    return a_before, a + g_out[0], p_acc


def _time_gradient(run: _Run, vf: VectorField, out, g_out, a_before_g0, t):
    """dL/dt_i = g_i · f(t_i, y_i) for i >= 1 and dL/dt_0 = -a(t_0⁺) · f(t_0, y_0) (continuous
    time derivative of the solution; one extra field evaluation per output time)."""
    T = out.shape[0]
    gt = torch.zeros(T, dtype=torch.float64)
    with torch.no_grad():
        for i in range(T):
            f = vf(run.times[i], out[i].view(vf.work_shape)).reshape(-1)
            if i == 0:
                gt[0] = -torch.dot(a_before_g0, f).double()
            else:
                gt[i] = torch.dot(g_out[i], f).double()
    return gt.to(t.dtype).to(t.device)


def odeint_adjoint(
    func,
    y0,
    t,
    *,
    rtol=1e-7,
    atol=1e-9,
    method="dopri5",
    options=None,
    adjoint_rtol=None,
    adjoint_atol=None,
    adjoint_method=None,
    adjoint_options=None,
    adjoint_params=None,
    adjoint_mode: str = "backsolve",
    event_fn=None,
    stats: SolverStats | None = None,
):
    """Like :func:`node_engine.odeint`, with gradients by the adjoint method.

    Args:
        func, y0, t, rtol, atol, method, options, stats: as in ``odeint`` (forward solve).
        adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options: the backward (augmented)
            solve in backsolve mode; default to the forward ones. ``adjoint_options`` also takes
            ``norm="default"`` (mixed norm: max of the RMS of y, a and a_θ) or ``"seminorm"``
            (a_θ left out; Kidger et al. 2021). Unused in checkpoint mode (its backward replays
            the forward steps). With the forward's method and tolerances the backward solve
            starts with the forward's last proposed step; ``first_step`` here overrides that
            (``first_step=None``: Hairer's initial step).
        adjoint_params: tensors to differentiate with respect to, beyond y0. Default:
            ``tuple(func.parameters())`` when func is an ``nn.Module``, else ``()``.
        adjoint_mode: ``"backsolve"`` (O(1) memory in steps; Chen et al. 2018) or
            ``"checkpoint"`` (exact gradient of the discrete solve; memory O(steps × N)).

    ``options=dict(step_control="per_sample")`` (see ``odeint``) is accepted only when nothing
    requires a gradient (inference, e.g. CNF log-densities); the solve is then the plain
    per-sample forward solve (``t`` may then be a (B, T) grid, and ``raise_on_failure`` works as
    in ``odeint``). With gradients it raises ValueError (the backsolve's parameter adjoint couples
    all samples): use ``odeint`` with per-sample control (backprop through the solve, (B, T)
    grids included) or joint step control.

    Returns:
        (T, *S) tensor (tuple for tuple y0), the same values as ``odeint``.

    ``method="kvaerno5"`` (stiff): backsolve solves the augmented system with kvaerno5 too, with a
    block-diagonal Newton matrix diag(I − hγJ, I + hγJᵀ, I) (J = ∂f/∂y; parameters cost nothing);
    it re-integrates y backwards, which on stiff problems grows the fast modes (tiny steps, poor
    gradients: docs/torchdiffeq.md), so there use ``adjoint_mode="checkpoint"`` (replays the
    forward's ESDIRK steps: the exact gradient of the discrete solve).

    Gradients reach y0, the adjoint_params, every output time's loss term and, when ``t``
    requires grad, ``t`` (continuous time derivative, one field call per output time). Backward
    NFE is added to ``stats.nfe_backward``. Double backward is not supported. A ``func`` that
    calls ``torch.autograd.grad`` must enable grad itself (the forward runs under no_grad). A
    ``func`` with a non-None ``adjoint_vjp(t, y, v, params)`` attribute computes the backsolve's
    vector-Jacobian products itself (see ``_AugmentedField``; the CNF's fused dynamics do).

    Raises:
        ValueError: as ``odeint``, plus unknown ``adjoint_mode`` / ``norm`` / adjoint options.
    """
    if event_fn is not None:  # terminal event mode, as odeint(event_fn=...), y(τ) by this adjoint
        from .events import solve_until_event
        return solve_until_event(odeint_adjoint, func, y0, t, event_fn, rtol=rtol, atol=atol, method=method,
                                 options=options, adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                                 adjoint_method=adjoint_method, adjoint_options=adjoint_options,
                                 adjoint_params=adjoint_params, adjoint_mode=adjoint_mode, stats=stats)
    if adjoint_mode not in ADJOINT_MODES:
        raise ValueError(f"unknown adjoint_mode {adjoint_mode!r}; valid: {', '.join(ADJOINT_MODES)}")
    if is_per_sample(options):
        y_members = tuple(y0) if isinstance(y0, (tuple, list)) else (y0,)
        if torch.is_grad_enabled() and (any(m.requires_grad for m in y_members) or t.requires_grad or any(
                p.requires_grad for p in (adjoint_params if adjoint_params is not None else
                                          (func.parameters() if isinstance(func, nn.Module) else ())))):
            grid = " and a (B, T) grid of output times" if isinstance(t, torch.Tensor) and t.dim() == 2 else ""
            raise ValueError(
                f"step_control='per_sample'{grid} is supported by odeint_adjoint only without gradients "
                "(inference, e.g. log-densities): the backsolve's parameter adjoint couples all samples. For "
                "gradients use odeint with per_sample (backprop through the solve) or joint step control")
        return odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, stats=stats)
    layout = StateLayout(y0)
    times, t_dtype = check_t(t)
    method = method or "dopri5"
    cfg = make_config(method, rtol, atol, options, layout, func=func)
    t_dtype = time_dtype(cfg.options, t_dtype)
    if adjoint_params is None:
        adjoint_params = tuple(func.parameters()) if isinstance(func, nn.Module) else ()
    params = tuple(p for p in adjoint_params if isinstance(p, torch.Tensor) and p.requires_grad)
    if any(not isinstance(p, torch.Tensor) for p in adjoint_params):
        raise TypeError("adjoint_params must be a sequence of tensors")
    adj_opts = dict(adjoint_options or {})
    norm = adj_opts.pop("norm", "default")
    for k in ("max_nfe", "stop"):  # the caller's compute bound and stop signal hold for the backward pass too
        if cfg.options.get(k) is not None and k not in adj_opts:
            adj_opts[k] = cfg.options[k]
    if not callable(norm) and norm not in NORMS:
        raise ValueError(f"unknown adjoint norm {norm!r}; valid: {', '.join(NORMS)} or a callable")
    adj_cfg, warm_start = None, False
    if adjoint_mode == "backsolve":
        adj_method = adjoint_method or method
        if adjoint_options is None and adj_method == method:
            adj_opts = {k: v for k, v in cfg.options.items() if k not in ("first_step", "norm")}
        adj_rtol = rtol if adjoint_rtol is None else adjoint_rtol
        adj_atol = atol if adjoint_atol is None else adjoint_atol
        adj_cfg = _augmented_config(adj_method, adj_rtol, adj_atol, adj_opts, layout, params, norm,
                                    forward_norm=cfg.options.get("norm"))
        adj_cfg.callbacks = find_callbacks(func, lambda z: z, adaptive=adj_method in ADAPTIVE or adj_method in STIFF,
                                           suffix="_adjoint",
                                           method=adj_method)
        # warm start only where the forward's step sizes mean something for the backward solve
        warm_start = (adj_method == method and (method in ADAPTIVE or method in STIFF) and "first_step" not in adj_opts
                      and adjoint_rtol is None and adjoint_atol is None)
    elif method == "scipy_solver" or method in IMPLICIT or method in ADAMS_METHODS:
        raise ValueError("adjoint_mode='checkpoint' needs a Runge-Kutta method (it replays the steps); "
                         f"{method} works with 'backsolve'")
    elif adjoint_method is not None and adjoint_method != method:
        raise ValueError("adjoint_method is not used in checkpoint mode (the backward replays the forward steps)")
    run = _Run(func, layout, times, t_dtype, cfg, adj_cfg, adjoint_mode, params, stats)
    run.warm_start = adjoint_mode == "backsolve" and warm_start
    z0 = layout.flatten(y0)
    if not (torch.is_grad_enabled() and (z0.requires_grad or params or t.requires_grad)):
        # nothing to differentiate (e.g. evaluation): a plain solve, no checkpoints kept
        vf = VectorField(func, layout, t_dtype)
        info = SolveInfo()
        try:
            out = cfg.solve(vf, z0, times, info, grad=False)
        finally:
            add_info(stats, info, vf, times=times)
        return layout.unflatten(out)
    out = _OdeintAdjoint.apply(run, t, z0, *params)
    return layout.unflatten(out)


def _augmented_config(method, rtol, atol, options, layout: StateLayout, params, norm,
                      forward_norm=None) -> SolverConfig:
    """Solver settings of the backsolve augmented system [y, a, a_θ] (flat, 2N + P).

    ``norm``: "default", "seminorm", or a callable given torchdiffeq's tuple (t, *y, *a, *a_θ) (t:
    a 0-d zero; node_engine's augmented state has no time adjoint) in the user's shapes. A callable
    forward ``norm`` without an adjoint one: max(norm(y), norm(a), RMS of each a_θ) (a_θ left out
    for "seminorm"), as torchdiffeq."""
    # a failed backward solve has no gradient to offer: it always raises its named error
    options = {k: v for k, v in options.items() if k != "raise_on_failure"}
    P = sum(p.numel() for p in params)
    # tolerances as the forward ones for y and a; for a_θ the smallest of them
    one = make_config(method, rtol, atol, options, layout)

    def aug_tol(x):
        if isinstance(x, float):
            return x
        return torch.cat([x, x, x.min().expand(P)])

    member = layout.member_segments() or [layout.numel]
    segments = member + member + ([P] if P else [])
    used = [True] * (2 * len(member)) + ([norm != "seminorm"] if P else [])
    norm_fn = None
    if callable(norm) or forward_norm is not None:
        N = layout.numel

        def pieces(v):
            ps, off = [], 2 * N
            for p in params:
                ps.append(v[off: off + p.numel()].view_as(p))
                off += p.numel()
            return layout.unflatten(v[:N]), layout.unflatten(v[N: 2 * N]), ps

        if callable(norm):
            def norm_fn(v):
                y, a, ps = pieces(v)
                ys, as_ = (y, a) if layout.is_tuple else ((y,), (a,))
                return norm((v.new_zeros(()), *ys, *as_, *ps))
        else:
            def norm_fn(v):
                y, a, ps = pieces(v)
                sizes = [forward_norm(y), forward_norm(a)]
                if norm != "seminorm":
                    sizes += [p.pow(2).mean().sqrt() for p in ps]
                return max(torch.as_tensor(x) for x in sizes)
    return SolverConfig(method, aug_tol(one.rtol), aug_tol(one.atol), one.options, segments, used, norm_fn=norm_fn)
