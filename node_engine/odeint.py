"""``odeint``: solve an initial value problem at given times (torchdiffeq-compatible signature).

Method names, tolerances, options and the output layout follow torchdiffeq 0.2.5, so switching is
one import; differences are documented in :func:`odeint`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .solvers import ADAPTIVE, FIXED, IMPLICIT, METHODS, STIFF
from .solvers.adams import ADAMS_METHODS, AdamsStepper
from .solvers.esdirk import ESDIRKRowStepper, ESDIRKStepper
from .solvers.implicit import NEWTON_MAX_ITERS, ImplicitStepper
from .solvers.adaptive import DEFAULT_MAX_NUM_STEPS, AdaptiveOptions, SolveInfo, StepRecord, integrate_adaptive
from .solvers.compiled_step import (AUTO_MIN_SOLVES, COMPILE_CHOICES, CompiledRKStepper, compile_unsupported,
                                   compiled_entry)
from .solvers.controller import PIController
from .solvers.fixed_grid import integrate_fixed, make_grid
from .solvers.hooks import CallableNorm, StepCallbacks, find_callbacks
from .solvers.norms import ErrorNorm
from .solvers.scipy_solver import SCIPY_METHOD, SCIPY_OPTIONS, solve_scipy
from .solvers.rk import RKStepper, acquire_stepper, release_stepper
from .solvers.state import RowField, StateLayout, VectorField
from .stats import SolverStats
from .time_grad import output_time_gradient, start_time_gradient

__all__ = ["odeint", "ADAPTIVE_OPTIONS", "FIXED_OPTIONS", "DEFAULT_MAX_NUM_STEPS"]

ADAPTIVE_OPTIONS = ("first_step", "max_num_steps", "step_t", "jump_t", "safety", "ifactor", "dfactor", "beta",
                    "step_control", "raise_on_failure", "max_nfe", "stop", "norm", "min_step", "max_step", "dtype",
                    "compile")
STEP_CONTROLS = ("joint", "per_sample")
AUTO_COMPILE_MAX_NUMEL = 1 << 16  # options["compile"]="auto" on the CPU: small states (see docs/benchmarks.md)
FIXED_OPTIONS = ("step_size", "grid", "grid_constructor", "perturb", "dtype", "interp", "max_nfe", "stop")  # interp: ignored
IMPLICIT_OPTIONS = ("newton_tol", "newton_max_iters")
# kvaerno5: every adaptive option (per_sample: per-row Jacobians and Newton solves) + the Newton
# ones; not compile (its steps are Newton iterations, not one fused explicit trial step)
STIFF_OPTIONS = tuple(k for k in ADAPTIVE_OPTIONS if k != "compile") + IMPLICIT_OPTIONS


def check_method(method: str) -> None:
    if not isinstance(method, str) or (method not in METHODS and method not in IMPLICIT and method != SCIPY_METHOD
                                       and method not in ADAMS_METHODS and method not in STIFF):
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(sorted(METHODS))}, "
                         f"{', '.join(STIFF)}, {', '.join(IMPLICIT)}, {', '.join(ADAMS_METHODS)}, {SCIPY_METHOD}")


def check_options(method: str, options, allowed_extra: tuple[str, ...] = ()) -> dict:
    """Validated copy of ``options``; unknown keys raise ValueError naming the valid ones."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    if is_per_sample(options) and method not in ADAPTIVE and method not in STIFF:
        raise ValueError(f"step_control='per_sample' needs an adaptive method ({', '.join([*ADAPTIVE, *STIFF])}), "
                         f"got {method!r}")
    if method == SCIPY_METHOD and is_per_sample(options):
        raise ValueError("step_control='per_sample' is not supported by scipy_solver")
    valid = (SCIPY_OPTIONS if method == SCIPY_METHOD else ADAPTIVE_OPTIONS if method in ADAPTIVE
             else STIFF_OPTIONS if method in STIFF
             else FIXED_OPTIONS + IMPLICIT_OPTIONS if method in IMPLICIT else FIXED_OPTIONS) + allowed_extra
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(
            f"unknown option(s) {bad} for method {method!r}; valid options: {', '.join(valid)}"
        )
    if (method in FIXED or method in IMPLICIT or method in ADAMS_METHODS) and sum(options.get(k) is not None for k in ("step_size", "grid", "grid_constructor")) > 1:
        raise ValueError("give at most one of options['step_size'], options['grid'], options['grid_constructor']")
    if options.get("norm") is not None and not callable(options["norm"]):
        raise ValueError(f"options['norm'] must be a callable norm(v) -> 0-d tensor, got {options['norm']!r}")
    if options.get("norm") is not None and is_per_sample(options):
        raise ValueError("options['norm'] is not supported with step_control='per_sample'")
    if options.get("grid_constructor") is not None and not callable(options["grid_constructor"]):
        raise ValueError("options['grid_constructor'] must be a callable (func, y0, t) -> grid tensor")
    for k in ("min_step", "max_step"):
        if k in options and not (float(options[k]) >= 0):
            raise ValueError(f"options[{k!r}] must be a number >= 0, got {options[k]!r}")
    if float(options.get("min_step", 0.0)) > float(options.get("max_step", math.inf)):
        raise ValueError("options['min_step'] must not exceed options['max_step']")
    if options.get("dtype") is not None and not (isinstance(options["dtype"], torch.dtype)
                                                 and options["dtype"].is_floating_point):
        raise ValueError(f"options['dtype'] must be a floating torch.dtype, got {options['dtype']!r}")
    if options.get("step_control", "joint") not in STEP_CONTROLS:
        raise ValueError(f"options['step_control'] must be one of {', '.join(STEP_CONTROLS)}; "
                         f"got {options['step_control']!r}")
    if not any(options.get("compile", False) is c or options.get("compile") == c and isinstance(c, str)
               for c in COMPILE_CHOICES):
        raise ValueError(f"options['compile'] must be False, True or 'auto', got {options['compile']!r}")
    if not isinstance(options.get("raise_on_failure", True), bool):
        raise ValueError(f"options['raise_on_failure'] must be True or False, got {options['raise_on_failure']!r}")
    max_nfe = options.get("max_nfe")
    if max_nfe is not None and not (isinstance(max_nfe, int) and not isinstance(max_nfe, bool) and max_nfe > 0):
        raise ValueError(f"options['max_nfe'] must be a positive int or None, got {max_nfe!r}")
    if options.get("stop") is not None and not callable(options["stop"]):
        raise ValueError(f"options['stop'] must be a zero-argument callable or None, got {options['stop']!r}")
    if is_per_sample(options):
        for k in ("step_t", "jump_t"):
            if options.get(k) is not None:
                raise ValueError(f"options[{k!r}] is not supported with step_control='per_sample'")
    return dict(options)


def is_per_sample(options) -> bool:
    return isinstance(options, dict) and options.get("step_control", "joint") == "per_sample"


def check_t(t, batch: int | None = None):
    """Validated output times and the dtype ``func`` receives t in.

    Returns a list of floats for a 1-D ``t`` (T,), or a (B, T) float64 numpy array for a 2-D ``t``
    (per-sample solves only: ``batch`` is B); every row strictly monotonic and finite, all rows
    in one direction.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a 1-D torch.Tensor of times, got {type(t).__name__}")
    t_dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
    if t.dim() == 2 and batch is not None:
        if t.shape[0] != batch or t.shape[1] < 1:
            raise ValueError(f"a 2-D t must have shape (B, T) = ({batch}, T >= 1) with one row per sample of y0; "
                             f"got {tuple(t.shape)}")
        grid = t.detach().cpu().double().numpy()
        if not np.isfinite(grid).all():
            raise ValueError("t contains NaN or inf")
        if grid.shape[1] > 1:
            diffs = np.diff(grid, axis=1)
            if not ((diffs > 0).all() or (diffs < 0).all()):
                raise ValueError("every row of t must be strictly increasing, or every row strictly decreasing "
                                 "(no repeats)")
        return grid, t_dtype
    if t.dim() != 1 or t.numel() < 1:
        more = (" (a (B, T) grid per sample needs options=dict(step_control='per_sample'))"
                if t.dim() == 2 else "")
        raise ValueError(f"t must be 1-D with at least one time, got shape {tuple(t.shape)}{more}")
    times = [float(x) for x in t.detach().cpu().double().tolist()]
    if not all(math.isfinite(x) for x in times):
        raise ValueError("t contains NaN or inf")
    if len(times) > 1:
        diffs = [b - a for a, b in zip(times[:-1], times[1:])]
        if not (all(x > 0 for x in diffs) or all(x < 0 for x in diffs)):
            raise ValueError("t must be strictly increasing or strictly decreasing (no repeats)")
    return times, t_dtype


def flat_tolerance(tol, layout: StateLayout, name: str):
    """rtol/atol as a float, or as an (N,) tensor of per-component tolerances."""

    def one(x, shape):
        if isinstance(x, torch.Tensor):
            if (x < 0).any() or not torch.isfinite(x).all():
                raise ValueError(f"{name} must be finite and >= 0")
            try:
                return torch.broadcast_to(x.to(layout.device, layout.dtype), shape).reshape(-1)
            except RuntimeError:
                raise ValueError(f"{name} of shape {tuple(x.shape)} does not broadcast to y's shape {shape}") from None
        x = float(x)
        if not (x >= 0 and math.isfinite(x)):
            raise ValueError(f"{name} must be finite and >= 0, got {x}")
        return x

    if layout.is_tuple and isinstance(tol, (tuple, list)):
        if len(tol) != len(layout.shapes):
            raise ValueError(f"{name} as a tuple needs one entry per member of y0 ({len(layout.shapes)})")
        parts = [one(x, s) for x, s in zip(tol, layout.shapes)]
        if all(isinstance(p, float) for p in parts) and len(set(parts)) == 1:
            return parts[0]
        return torch.cat([
            p if isinstance(p, torch.Tensor) else torch.full((n,), p, dtype=layout.dtype, device=layout.device)
            for p, n in zip(parts, layout.sizes)
        ])
    if layout.is_tuple and isinstance(tol, torch.Tensor) and tol.numel() > 1:
        raise ValueError(f"for a tuple y0 give {name} as a float or a tuple with one entry per member")
    return one(tol, layout.shapes[0] if not layout.is_tuple else ())


@dataclass
class SolverConfig:
    """Everything about a solve except the field and the initial state (shared with the adjoint)."""

    method: str
    rtol: object
    atol: object
    options: dict
    segments: list[int] | None = None
    used: list[bool] | None = None
    norm_fn: object = None  # flat weighted error (N,) -> its size; None: the mixed RMS
    callbacks: StepCallbacks | None = None

    def solve(self, vf, z0: torch.Tensor, times, info: SolveInfo,
              record: StepRecord | None = None, grad: bool | None = None) -> torch.Tensor:
        """(T, *z0.shape) states at ``times`` of z' = vf(t, z), z(times[0]) = z0: z0 (N,) with a
        :class:`VectorField` (joint), (B, D) with a :class:`RowField` (per sample; ``times`` a
        list or a (B, T) array)."""
        if self.method == SCIPY_METHOD:
            return solve_scipy(vf, z0, times, info, self.options, self.rtol, self.atol)
        if grad is None:
            grad = torch.is_grad_enabled()
        if self.method in ADAMS_METHODS:  # multistep: a fresh history per solve
            stepper = AdamsStepper(self.method, vf.work_shape, z0.device, z0.dtype)
            return self._solve(vf, z0, times, info, record, FIXED["rk4"], stepper)  # tab: read as "fixed grid"
        if self.method in IMPLICIT:
            stepper = ImplicitStepper(IMPLICIT[self.method], vf.work_shape, z0.device, z0.dtype,
                                      tol=self.options.get("newton_tol"),
                                      max_iters=self.options.get("newton_max_iters", NEWTON_MAX_ITERS))
            return self._solve(vf, z0, times, info, record, IMPLICIT[self.method], stepper)
        if self.method in STIFF:
            per_row = isinstance(vf, RowField)
            stepper = (ESDIRKRowStepper if per_row else ESDIRKStepper)(
                STIFF[self.method], z0.shape if per_row else vf.work_shape, z0.device, z0.dtype, self.rtol,
                self.atol, newton_tol=self.options.get("newton_tol"),
                newton_max_iters=self.options.get("newton_max_iters"))
            if per_row:  # every row's steps land on its own output times (as the joint steps below)
                return self._solve(vf, z0, times, info, record, STIFF[self.method], stepper, land_rows=True)
            # steps land on every output time: the cubic Hermite interpolant (order 3) cost up to 60x
            # the tolerance on Robertson at rtol 1e-6, the steps themselves < 3x (docs/benchmarks.md)
            return self._solve(vf, z0, times, info, record, STIFF[self.method], stepper,
                               land=[float(x) for x in times[1:-1]])
        tab = METHODS[self.method]
        compiled = self._compiled_stepper(tab, vf, z0, info, grad)
        if compiled is not None:
            return self._solve(vf, z0, times, info, record, tab, compiled)
        if isinstance(vf, RowField):
            stepper = RKStepper(tab, z0.shape, z0.device, z0.dtype, reuse_buffer=not grad, per_row=True)
            return self._solve(vf, z0, times, info, record, tab, stepper)
        if grad:
            stepper = RKStepper(tab, vf.work_shape, z0.device, z0.dtype, reuse_buffer=False)
            return self._solve(vf, z0, times, info, record, tab, stepper)
        stepper = acquire_stepper(tab, vf.work_shape, z0.device, z0.dtype)
        try:
            return self._solve(vf, z0, times, info, record, tab, stepper)
        finally:
            release_stepper(stepper)

    def _compiled_stepper(self, tab, vf, z0, info, grad) -> CompiledRKStepper | None:
        """A stepper with a compiled trial step when ``options["compile"]`` asks for one and this
        solve allows it (no autograd through the steps; see :mod:`.solvers.compiled_step`); else
        None, with the reason in ``info.compile_fallback`` when compiling was asked for."""
        want = self.options.get("compile", False)
        if want is False:
            return None
        norm = self._norm()
        why = "autograd records the steps (backprop through the solve)" if grad else (
            compile_unsupported(tab, vf, norm))
        if why is None and want == "auto" and z0.device.type != "cuda" and z0.numel() > AUTO_COMPILE_MAX_NUMEL:
            why = f"'auto': on the CPU only states up to {AUTO_COMPILE_MAX_NUMEL} elements gain"
        if why is not None:
            info.compile_fallback = why
            return None
        per_row = isinstance(vf, RowField)
        entry = compiled_entry(tab, vf, norm, z0.shape, z0.dtype, z0.device, per_row,
                               min_uses=AUTO_MIN_SOLVES if want == "auto" else 1)
        if entry is None:
            info.compile_fallback = f"'auto': compiled from the {AUTO_MIN_SOLVES}rd solve of the same field on"
            return None
        if entry.failed is not None:
            info.compile_fallback = entry.failed
            return None
        return CompiledRKStepper(tab, z0.shape if per_row else vf.work_shape, z0.device, z0.dtype,
                                 per_row=per_row, entry=entry, norm=norm, info=info, arg=vf.pure()[1])

    def _norm(self):
        if self.norm_fn is not None:
            return CallableNorm(self.rtol, self.atol, self.norm_fn)
        return ErrorNorm(self.rtol, self.atol, self.segments, self.used)

    def _solve(self, vf, z0, times, info, record, tab, stepper, land=(), land_rows=False) -> torch.Tensor:
        o = self.options
        if not tab.adaptive:
            user_grid = o.get("grid")
            if o.get("grid_constructor") is not None:
                user_grid = o["grid_constructor"](getattr(vf, "func", vf), z0,
                                                  torch.tensor(times, dtype=torch.float64))
            if o.get("step_size") is None and user_grid is None and len(times) == 2:
                # torchdiffeq #137: one step over the whole span is rarely what was meant
                warnings.warn(f"method {self.method!r} without step_size or grid takes one step from t[0] to t[1] "
                              "(it steps on the output times): pass options=dict(step_size=...)", stacklevel=4)
            grid = make_grid(times, o.get("step_size"), _floats(user_grid, "grid"))
            info.status = np.zeros(1, dtype=np.int64)
            return integrate_fixed(vf, z0, times, stepper, grid, info, record,
                                   max_nfe=o.get("max_nfe"), stop=o.get("stop"),
                                   perturb=bool(o.get("perturb", False)), callbacks=self.callbacks)
        norm = self._norm()
        ctrl = PIController(
            tab.control_order,
            safety=float(o.get("safety", 0.9)),
            ifactor=float(o.get("ifactor", 10.0)),
            dfactor=float(o.get("dfactor", 0.2)),
            beta=float(o.get("beta", 0.0)),
        )
        mns = o.get("max_num_steps", DEFAULT_MAX_NUM_STEPS)
        if not (isinstance(mns, int) and mns > 0):
            raise ValueError(f"options['max_num_steps'] must be a positive int, got {mns!r}")
        fs = o.get("first_step")
        if fs is not None and not (float(fs) != 0 and math.isfinite(float(fs))):
            raise ValueError(f"options['first_step'] must be a nonzero finite number, got {fs}")
        aopts = AdaptiveOptions(
            first_step=fs, max_num_steps=mns,
            step_t=tuple(_floats(o.get("step_t"), "step_t") or ()) + tuple(land),
            jump_t=tuple(_floats(o.get("jump_t"), "jump_t") or ()),
            raise_on_failure=o.get("raise_on_failure", True),
            max_nfe=o.get("max_nfe"), stop=o.get("stop"),
            min_step=float(o.get("min_step", 0.0)), max_step=float(o.get("max_step", math.inf)),
            callbacks=self.callbacks, land_outputs=land_rows,
        )
        return integrate_adaptive(vf, z0, times, stepper, norm, ctrl, aopts, info, record)


def _floats(x, name) -> list[float] | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().reshape(-1).tolist()
    try:
        return [float(v) for v in x]
    except TypeError:
        raise ValueError(f"options[{name!r}] must be a 1-D sequence or tensor of times") from None


def make_config(method, rtol, atol, options, layout: StateLayout, allowed_extra=(), func=None) -> SolverConfig:
    """Validated :class:`SolverConfig`; with ``func``, its forward step callbacks are attached."""
    check_method(method)
    opts = check_options(method, options, allowed_extra)
    r = flat_tolerance(rtol, layout, "rtol")
    a = flat_tolerance(atol, layout, "atol")
    if (method in ADAPTIVE or method in STIFF) and isinstance(r, float) and isinstance(a, float) and r == 0 and a == 0:
        raise ValueError("rtol and atol cannot both be 0 for an adaptive method")
    norm_fn = None
    if opts.get("norm") is not None:
        user_norm = opts["norm"]
        norm_fn = lambda v: user_norm(layout.unflatten(v))  # noqa: E731
    cbs = None
    if func is not None and not is_per_sample(opts):
        cbs = find_callbacks(func, layout.unflatten, adaptive=method in ADAPTIVE or method in STIFF, method=method)
        if method == SCIPY_METHOD and cbs is not None:
            warnings.warn("scipy_solver calls no step callbacks", stacklevel=3)
    return SolverConfig(method, r, a, opts, segments=layout.member_segments(), norm_fn=norm_fn, callbacks=cbs)


def time_dtype(options, t_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``func`` receives t in: ``options["dtype"]`` when given, else t's own."""
    d = options.get("dtype") if isinstance(options, dict) else None
    return d if d is not None else t_dtype


def add_info(stats: SolverStats | None, info: SolveInfo, vf, *, backward: bool = False, times=None) -> None:
    """Add a solve's counts (``info``, and the NFE of its field wrapper ``vf``) to ``stats``; a
    forward solve also sets ``stats.status`` and, given its output ``times`` ((T,) list or (B, T)
    array), adds the interval it covered to ``stats.forward_time``."""
    if stats is None:
        return
    if backward:
        stats.nfe_backward += vf.nfe
    else:
        stats.nfe_forward += vf.nfe
        if times is not None:
            stats.forward_steps_accepted += info.accepted
            stats.forward_time += float(np.abs(np.asarray(times)[..., -1] - np.asarray(times)[..., 0]).sum())
        stats.sample_evaluations += vf.sample_evaluations
        if info.status is not None:
            stats.status = torch.from_numpy(info.status.copy())
    stats.compile_seconds += info.compile_s
    stats.compiled_steps += info.compiled_steps
    if info.compile_fallback is not None:
        stats.compile_fallback = info.compile_fallback
    stats.steps_accepted += info.accepted
    stats.steps_rejected += info.rejected
    if info.accepted:
        stats.last_step_size = info.last_step


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method="dopri5", options=None, event_fn=None,
           stats: SolverStats | None = None):
    """Solve dy/dt = func(t, y), y(t[0]) = y0, and return y at every time in ``t``.

    Args:
        func: callable ``func(t, y)``; t is a 0-d tensor (dtype of ``t``), y shaped like ``y0``;
            returns dy/dt with y's shape and dtype (a tuple of such for a tuple ``y0``). Without
            autograd, y may be a view of a solver buffer: func must not modify it in place or
            keep it past the call. Per-sample step control: t is a (B_active,) tensor (each
            active row's own time) and y the active rows (B_active, ...).
        y0: initial state, a floating tensor of any shape ``(*S)``, or a tuple of tensors
            (one dtype/device) as in torchdiffeq.
        t: (T,) strictly increasing or strictly decreasing times (backwards integration works).
            With ``step_control="per_sample"`` also (B, T): row b is sample b's own strictly
            monotonic grid (rows may start at different times; all rows in one direction).
        rtol, atol: relative/absolute tolerance; floats, or tensors broadcastable to ``y0``
            (per component; per sample: to one sample's shape ``y0.shape[1:]``), or for a tuple
            ``y0`` a tuple with one entry per member. The step is accepted when the RMS of
            err / (atol + rtol·max(|y_n|, |y_n+1|)) is <= 1 (a tuple state takes the max over
            members of each member's RMS, so a member with zero derivative never changes the steps).
        method: ``dopri5`` (default; None means it too, as in torchdiffeq), ``tsit5``, ``bosh3``,
            ``dopri8``, ``adaptive_heun``, ``fehlberg2`` (adaptive), ``euler``, ``midpoint``,
            ``heun2``, ``heun3``, ``rk4`` (fixed grid: on ``step_size``'s lattice, a ``grid``, a
            ``grid_constructor``'s grid, or else on the output times as torchdiffeq), or
            ``scipy_solver`` (``scipy.integrate.solve_ivp``, option ``solver``; no autograd graph),
            or ``kvaerno5``: adaptive ESDIRK 5(4) for stiff problems (Newton on a dense Jacobian:
            small states; per sample: one D×D Jacobian per row; steps land on the output times;
            options ``newton_tol``, ``newton_max_iters``; :mod:`.solvers.esdirk`).
        options: adaptive: ``first_step`` (default: Hairer's estimate), ``max_num_steps`` (trial
            steps, per row; default 100000), ``step_t`` (times to step on exactly), ``jump_t``
            (discontinuities of func: stepped on, the field restarted on the far side), ``safety``
            (0.9), ``ifactor`` (10), ``dfactor`` (0.2), ``beta`` (PI coefficient, default 0
            = I controller; 0.04 = Hairer's dopri5.f PI controller), ``raise_on_failure``
            (default True: a failure raises its named error; False: the failed row stops, its
            outputs at times it never reached are NaN, the solve returns and ``stats.status``
            says which rows failed and why). Fixed: ``step_size`` or ``grid`` (tensor of times
            covering t); the grid always includes the times in ``t``.
            Both: ``max_nfe`` (int, default None: no budget): the solve raises
            :class:`~node_engine.errors.NFEBudgetExceeded` once more than ``max_nfe`` evaluations
            of ``func`` were made (checked after every trial step, so it overshoots by at most one
            step's stages; a solve that needs exactly ``max_nfe`` succeeds); with
            ``raise_on_failure=False`` every row still active gets ``SolveStatus.NFE_BUDGET``
            instead. ``stop`` (zero-argument callable, default None): called before every trial
            step; when it returns True the solve raises
            :class:`~node_engine.errors.SolveCancelled` (always). It runs once per step, so keep it
            cheap (e.g. re-read a flag at most every few seconds). The adjoint's backward pass takes
            both from the forward options unless ``adjoint_options`` sets them; its budget counts
            the whole backward pass. Also: ``min_step`` / ``max_step`` (bounds on |h|; a step at
            min_step is always accepted), ``norm`` (callable ``norm(v) -> 0-d tensor`` replacing the
            RMS of the weighted error v, given in y0's layout). Fixed: ``grid_constructor(func, y0,
            t) -> grid``, ``perturb`` (evaluate just inside each step).
            ``compile`` (adaptive explicit RK, no autograd through the steps: ``torch.no_grad``
            solves and both solves of ``odeint_adjoint``): ``False`` (default), ``True`` (each trial
            step — stages, solution, error ratio — is one ``torch.compile``d function, cached and
            reused across steps and solves; the first solve compiles, seconds to minutes on a CPU,
            reported in ``stats.compile_seconds``; a graph break falls back to eager with a warning
            and ``stats.compile_fallback``; func must be pure: no Python-side state, no ``.item()``)
            or ``"auto"`` (as True, from the third solve of the same field object on, CPU states
            up to 65536 elements; see :mod:`.solvers.compiled_step`, docs/benchmarks.md "Issue 17").
            Any method: ``dtype`` (the dtype func receives t in; default t's). torchdiffeq's step
            callbacks on ``func`` (``callback_step``, ``callback_accept_step``,
            ``callback_reject_step``; see :mod:`node_engine.solvers.hooks`) are called.
            ``step_control``: ``"joint"`` (default; one step size for the whole state: one row)
            or ``"per_sample"``: dim 0 of y0 (of every tuple member) is a batch of B rows, and
            every row gets its own time, step size, accept/reject decision and status, in the
            same loop; finished (and failed) rows leave the active set. func must treat rows
            independently. A sample's result does not depend on its batch-mates (up to
            round-off in func's batched kernels, which in float32 can change a step decision:
            then within the tolerance). Every adaptive method; any trailing shape; no
            step_t/jump_t. Backprop through the solve works; ``stats.sample_evaluations``
            counts rows evaluated (the work).
        event_fn: ``(t, y) -> tensor``: terminal event mode (torchdiffeq): ``t`` has two times
            (start and direction) and the result is ``(event_t, (2, *S) states at t[0] and event_t)``
            (a tuple of such for a tuple y0); several values: the first to reach zero is the event;
            see :mod:`node_engine.events`.
        stats: a :class:`SolverStats`; nfe_forward, steps and last step size are added to it
            (per sample: steps summed over rows); ``stats.status`` is set to this solve's
            per-row :class:`~node_engine.errors.SolveStatus` ((B,) per sample, (1,) joint).

    Returns:
        (T, *S) tensor with y0's dtype (tuple of such for tuple y0); ``out[0]`` is ``y0``; with a
        (B, T) ``t``, ``out[j, b] = y_b(t[b, j])``. Outputs between steps come from each method's
        dense output (its continuous extension); the last step lands exactly on ``t[-1]``; the
        field is never evaluated outside [t0, t1].

    Raises:
        ValueError: bad ``t`` (not 1-D or (B, T), not strictly monotonic), unknown method or
            option, bad tolerances, func output of the wrong shape/dtype.
        node_engine.errors.StepSizeUnderflowError, MaxNumStepsError, NonFiniteStateError,
            NFEBudgetExceeded (unless ``raise_on_failure=False``; per sample the message names the
            sample); SolveCancelled (``stop`` returned True).

    Backpropagating through the result gives the exact gradient of the discrete solve (step
    sizes are not differentiated); a ``t`` that requires grad gets dL/dt of the exact solution
    (:mod:`node_engine.time_grad`; joint step control). A derivative returned in another floating
    dtype is cast to y0's. For O(1) memory use :func:`node_engine.odeint_adjoint`.
    """
    if event_fn is not None:  # torchdiffeq's terminal event mode: returns (event_t, states at t0 and event)
        from .events import solve_until_event
        return solve_until_event(odeint, func, y0, t, event_fn, rtol=rtol, atol=atol, method=method,
                                 options=options, stats=stats)
    per_sample = is_per_sample(options)
    layout = StateLayout(y0, batched=per_sample)
    times, t_dtype = check_t(t, layout.batch)
    cfg = make_config(method or "dopri5", rtol, atol, options, layout, func=func)
    t_dtype = time_dtype(cfg.options, t_dtype)
    vf = (RowField if per_sample else VectorField)(func, layout, t_dtype)
    info = SolveInfo()
    z0 = layout.flatten(y0)
    if per_sample:
        z0 = z0.contiguous()
        if isinstance(times, list):
            times = np.broadcast_to(np.asarray(times), (layout.batch, len(times)))
    t_grad = torch.is_grad_enabled() and t.requires_grad and not per_sample
    z_start = start_time_gradient(t, z0, VectorField(func, layout, t_dtype), times[0]) if t_grad else z0
    try:
        out = cfg.solve(vf, z_start, times, info)
    finally:
        add_info(stats, info, vf, times=times)
    if t_grad:
        out = output_time_gradient(t, out, z0, VectorField(func, layout, t_dtype), times)
    return layout.unflatten(out)
