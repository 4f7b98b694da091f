"""The adaptive Runge–Kutta loop: trial step, accept/reject, dense output at requested times.

Bookkeeping only: the stages come from :class:`~.rk.RKStepper`, the step sizes from
:class:`~.controller.PIController`, the error size from :class:`~.norms.ErrorNorm`. One host
synchronisation per trial step (the accept decision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import MaxNumStepsError, NonFiniteStateError, StepSizeUnderflowError
from .controller import PIController, initial_step_size
from .rk import RKStepper

__all__ = ["AdaptiveOptions", "SolveInfo", "StepRecord", "integrate_adaptive"]

DEFAULT_MAX_NUM_STEPS = 100_000
MAX_NONFINITE_RETRIES = 12  # consecutive NaN/inf trial steps, each shrinking h tenfold


@dataclass
class AdaptiveOptions:
    first_step: float | None = None
    max_num_steps: int = DEFAULT_MAX_NUM_STEPS
    step_t: tuple[float, ...] = ()
    jump_t: tuple[float, ...] = ()


@dataclass
class SolveInfo:
    """What a solve did (added to a SolverStats by the caller)."""

    accepted: int = 0
    rejected: int = 0
    last_step: float = float("nan")
    next_step: float = float("nan")  # the controller's proposal after the last accepted step


@dataclass
class StepRecord:
    """Accepted steps of a forward solve, for the checkpoint adjoint.

    ``bounds[n], bounds[n+1]`` are step n's start/end times, ``starts[n]`` its start state (N,),
    ``eval_end[n]`` the time its c=1 stages used; ``k1_time[n]`` the time its first stage used
    (just after t_n when step n starts at a jump); ``outputs[i-1]`` = (n, θ) places output i >= 1
    in step n (θ = None: exactly at the step's end).
    """

    bounds: list[float] = field(default_factory=list)
    starts: list[torch.Tensor] = field(default_factory=list)
    eval_end: list[float] = field(default_factory=list)
    outputs: list[tuple[int, float | None]] = field(default_factory=list)
    k1_time: list[float] = field(default_factory=list)


def _stops(times: list[float], opts: AdaptiveOptions, d: float) -> list[tuple[float, bool]]:
    """Times to land on exactly, in integration order: (time, is_jump); the last is t_end."""
    t0, t1 = times[0], times[-1]
    inside = {}
    for s in opts.step_t:
        if d * (s - t0) > 0 and d * (t1 - s) > 0:
            inside[s] = inside.get(s, False)
    for s in opts.jump_t:
        if d * (s - t0) > 0 and d * (t1 - s) > 0:
            inside[s] = True
    out = sorted(inside.items(), key=lambda kv: d * kv[0])
    out.append((t1, False))
    return out


def _check_finite(t0: float, z0: torch.Tensor, k1: torch.Tensor) -> None:
    if not bool(torch.isfinite(z0.detach()).all() & torch.isfinite(k1.detach()).all()):
        what = "initial state y0" if not bool(torch.isfinite(z0).all()) else "derivative f(t0, y0)"
        raise NonFiniteStateError(f"the {what} contains NaN/inf at t={t0:g}", t=t0)


def integrate_adaptive(
    vf,
    z0: torch.Tensor,
    times: list[float],
    stepper: RKStepper,
    norm,
    ctrl: PIController,
    opts: AdaptiveOptions,
    info: SolveInfo,
    record: StepRecord | None = None,
) -> torch.Tensor:
    """Solve z' = vf(t, z) from times[0] and return the states at ``times``: (T, N).

    ``times`` strictly monotonic floats; row 0 is z0 itself. Raises the SolverError family.
    """
    T = len(times)
    t0, t_end = times[0], times[-1]
    d = 1.0 if t_end > t0 else -1.0
    outs: list[torch.Tensor] = [z0]
    if T == 1:
        return z0.unsqueeze(0)
    stops = _stops(times, opts, d)
    i_stop = 0
    shape = stepper.shape
    k1 = vf(t0, z0.view(shape))
    span = abs(t_end - t0)
    if opts.first_step is not None or not norm.covers_all:
        _check_finite(t0, z0, k1)
        h = min(abs(float(opts.first_step)), span) if opts.first_step is not None else None
    else:
        h = None  # Hairer's initial step syncs ‖y0‖ and ‖f0‖ anyway: its NaN/inf is the check
    if h is None:
        h = initial_step_size(vf, t0, z0, k1, d, abs(stops[0][0] - t0), stepper.tab.control_order, norm,
                              on_nonfinite=lambda: _check_finite(t0, z0, k1))
    reuse = stepper.reuse
    if reuse:
        stepper.set_k1(k1)
        k1 = None
    t, z = t0, z0
    i_out = 1
    n_trials = 0
    n_nonfinite = 0
    eps = 2.0**-52
    if record is not None:
        record.bounds.append(t0)
        record.k1_time.append(t0)
    k1_time = t0
    while True:
        target, is_jump = stops[i_stop]
        remaining = d * (target - t)
        landing = 1.01 * h >= remaining  # stretch by <= 1% rather than leave a sliver (dopri5.f)
        t_new = target if landing else t + d * h
        hs = t_new - t
        if t_new == t or abs(hs) <= 4 * eps * max(abs(t), abs(t_new)):
            if n_nonfinite:
                raise NonFiniteStateError(
                    f"NaN/inf in every trial step from t={t:g}: the state or its derivative is not "
                    f"finite even for tiny steps", t=t)
            raise StepSizeUnderflowError(
                f"step size {abs(hs):.3g} underflowed at t={t:g} (the problem may be stiff or "
                f"singular there; loosen rtol/atol or use a fixed-step method)", t=t)
        n_trials += 1
        if n_trials > opts.max_num_steps:
            raise MaxNumStepsError(
                f"max_num_steps={opts.max_num_steps} trial steps reached at t={t:g} before t1={t_end:g}; "
                f"raise options['max_num_steps'] or loosen rtol/atol", t=t)
        t_eval_end = math.nextafter(t_new, t) if (landing and is_jump) else t_new
        z_new = stepper.step(vf, t, t_new, t_eval_end, z, k1)
        with torch.no_grad():
            err, err3 = stepper.error()
            ratio = abs(hs) * norm.ratio(z, z_new, err, err3)  # the one host sync of the step
        if not ratio <= 1.0:
            info.rejected += 1
            if math.isfinite(ratio):
                n_nonfinite = 0
                h = ctrl.reject(abs(hs), ratio)
            else:
                n_nonfinite += 1
                if n_nonfinite > MAX_NONFINITE_RETRIES:
                    raise NonFiniteStateError(
                        f"NaN/inf in the state or derivative of {n_nonfinite} consecutive trial steps "
                        f"from t={t:g} (last h={abs(hs):.3g})", t=t)
                h = abs(hs) * 0.1
            continue
        # accepted
        n_nonfinite = 0
        info.accepted += 1
        info.last_step = abs(hs)
        if record is not None:
            record.starts.append(z)
            record.bounds.append(t_new)
            record.eval_end.append(t_eval_end)
        if i_out < T and d * (times[i_out] - t_new) <= 0:
            thetas = []
            while i_out < T and d * (times[i_out] - t_new) < 0:
                thetas.append((times[i_out] - t) / hs)
                i_out += 1
            if thetas:
                outs.extend(stepper.dense(vf, t, t_new, z, thetas).unbind(0))
                if record is not None:
                    n = len(record.starts) - 1
                    record.outputs.extend((n, th) for th in thetas)
            if i_out < T and times[i_out] == t_new:
                outs.append(z_new)
                if record is not None:
                    record.outputs.append((len(record.starts) - 1, None))
                i_out += 1
        h = ctrl.accept(abs(hs), ratio)
        info.next_step = h
        t, z = t_new, z_new
        if landing:
            i_stop += 1
            if i_stop == len(stops):
                break
            if is_jump:
                # the field may jump here: restart from its right-hand value
                k1_time = math.nextafter(t, t_end)
                k1 = vf(k1_time, z.view(shape))
                if reuse:
                    stepper.set_k1(k1)
                    k1 = None
                if record is not None:
                    record.k1_time.append(k1_time)
                continue
        k1_time = t
        if record is not None:
            record.k1_time.append(t)
        k1 = stepper.last_stage if stepper.fsal else vf(t, z.view(shape))
        if reuse:
            stepper.set_k1(k1)
            k1 = None
    return torch.stack(outs)
