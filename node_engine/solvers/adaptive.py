"""The adaptive Runge–Kutta loop, one for both step-control modes.

Each iteration: the stepper makes a trial step (:class:`~.rk.RKStepper`), the norm turns its error
estimate into one ratio per row (:class:`~.norms.ErrorNorm`; the one host synchronisation of the
step), the controller accepts or rejects each row and proposes its next step
(:class:`~.controller.PIController`), accepted rows write their outputs from the dense output and
advance. A *joint* solve is one row (the whole state; host quantities are Python floats); a
*per-sample* solve has B rows with their own times, steps and output grids (host quantities are
(B_active,) numpy arrays, see :mod:`.rows`), and rows that finish or fail leave the active set
(compaction). Every row ends with a :class:`~node_engine.errors.SolveStatus`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SolveCancelled, SolveStatus
from .controller import PIController, initial_step_size
from .rk import RKStepper
from .rows import any_, clip, count, isfinite, maximum, minimum, next_time, not_, to_device, where

__all__ = ["AdaptiveOptions", "SolveInfo", "StepRecord", "integrate_adaptive", "DEFAULT_MAX_NUM_STEPS",
           "check_stop", "over_budget"]

DEFAULT_MAX_NUM_STEPS = 100_000
MAX_NONFINITE_RETRIES = 12  # consecutive NaN/inf trial steps of a row, each shrinking h tenfold
_EPS4 = 4 * 2.0**-52


@dataclass
class AdaptiveOptions:
    first_step: float | None = None
    max_num_steps: int = DEFAULT_MAX_NUM_STEPS
    step_t: tuple[float, ...] = ()
    jump_t: tuple[float, ...] = ()
    raise_on_failure: bool = True
    max_nfe: int | None = None  # NFE budget of the solve (None: none)
    stop: Callable[[], bool] | None = None  # polled before every trial step; True ends the solve
    min_step: float = 0.0  # torchdiffeq's bounds on |h|; a step of |h| <= min_step is always accepted
    max_step: float = math.inf
    callbacks: object = None  # hooks.StepCallbacks (joint solves)
    land_outputs: bool = False  # per row: every row's steps land on its own output times (no dense output)


def check_stop(stop, t) -> None:
    """Raise SolveCancelled when the caller's ``stop()`` says so (one call per step: the caller
    keeps it cheap, e.g. by re-reading a cancel flag at most every few seconds)."""
    if stop is not None and stop():
        raise SolveCancelled(f"the solve was stopped by its caller at t={float(np.min(t)):g}", t=float(np.min(t)))


def over_budget(vf, max_nfe: int | None) -> bool:
    """True when the field has been evaluated more than ``max_nfe`` times (``vf.nfe`` counts calls)."""
    return max_nfe is not None and vf.nfe > max_nfe


def budget_message(vf, max_nfe: int, t, where_: str = "") -> str:
    return (f"max_nfe={max_nfe} function evaluations exceeded ({vf.nfe} made){where_} at t={t:g}; raise "
            f"options['max_nfe'] (a deployment's per-solve budget) or loosen rtol/atol")


@dataclass
class SolveInfo:
    """What a solve did (added to a SolverStats by the caller)."""

    accepted: int = 0
    rejected: int = 0
    last_step: float = float("nan")
    next_step: float = float("nan")  # the controller's proposal after the last accepted step
    status: np.ndarray | None = None  # (rows,) int64 SolveStatus values
    compile_s: float = 0.0  # wall time of calls that compiled the trial step (options["compile"])
    compiled_steps: int = 0  # trial steps made by a compiled step function
    compile_fallback: str | None = None  # why the compiled step was not used (None: it was, or not asked)


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


def integrate_adaptive(
    vf,
    z0: torch.Tensor,
    times,
    stepper: RKStepper,
    norm,
    ctrl: PIController,
    opts: AdaptiveOptions,
    info: SolveInfo,
    record: StepRecord | None = None,
) -> torch.Tensor:
    """Solve z' = vf(t, z) from the first output time and return the states at the output times.

    Args:
        vf: field wrapper (:class:`~.state.VectorField` joint, :class:`~.state.RowField` per row).
        z0: (N,) joint or (B, D) per row.
        times: joint: T strictly monotonic floats; per row: a (B, T) float64 array, each row
            strictly monotonic, all in one direction.
        stepper: ``stepper.per_row`` selects the mode; record: joint only (checkpoint adjoint).
    Returns:
        (T, *z0.shape); row 0 is z0. A row that failed (``opts.raise_on_failure=False``) has NaN
        at the output times it never reached; ``info.status`` holds each row's SolveStatus.
    Raises:
        The named SolverError of the first failing row when ``opts.raise_on_failure``.
    """
    per_row = stepper.per_row
    grid = np.asarray(times, dtype=np.float64).reshape(z0.shape[0] if per_row else 1, -1)  # (rows, T)
    n_rows, T = grid.shape
    info.status = np.zeros(n_rows, dtype=np.int64)
    pieces: list[tuple] = [(np.zeros(n_rows, dtype=np.int64), np.arange(n_rows), z0)]  # (j, row, values)
    if T > 1:
        _loop(vf, z0, grid, stepper, norm, ctrl, opts, info, record, pieces)
    return _assemble(pieces, z0, T, per_row)


def _assemble(pieces, z0, T, per_row) -> torch.Tensor:
    """(T, *z0.shape) from the (output index, row, value) pieces; NaN where nothing was written."""
    if not per_row and sum(len(p[0]) for p in pieces) == T:  # joint, complete: the outputs in order
        return torch.cat([p[2].reshape(-1, *z0.shape) for p in pieces])
    out = torch.full((T, *z0.shape), float("nan"), dtype=z0.dtype, device=z0.device)
    j = to_device(np.concatenate([p[0] for p in pieces]), z0.device)
    vals = torch.cat([p[2].reshape(-1, *z0.shape[per_row:]) for p in pieces])
    if per_row:
        idx = (j, to_device(np.concatenate([p[1] for p in pieces]), z0.device))
    else:
        idx = (j,)
    return out.index_put(idx, vals)


def _loop(vf, z, grid, stepper, norm, ctrl, opts, info, record, pieces) -> None:
    per_row = stepper.per_row
    n_rows, T = grid.shape
    d = 1.0 if grid[0, -1] > grid[0, 0] else -1.0
    raise_on_failure = opts.raise_on_failure
    if per_row:
        gid = np.arange(n_rows)  # global index of each active row
        t = grid[:, 0].copy()
        t_end = grid[:, -1].copy()
        i_out = np.ones(n_rows, dtype=np.int64)
        stops, target, is_jump = None, t_end, False
        zero, prev = np.zeros(n_rows, dtype=np.int64), np.full(n_rows, 1e-4)
    else:
        gid = np.zeros(1, dtype=np.int64)
        times = grid[0].tolist()
        t, t_end = times[0], times[-1]
        i_out = 1
        stops = _stops(times, opts, d)
        target, is_jump = stops[0]
        zero, prev = 0, 1e-4
    i_stop = 0
    n_bad = zero  # consecutive non-finite trial steps per row
    land_rows = per_row and opts.land_outputs

    def row_target():
        """Per row: where the rows step to next (their end, or with land_outputs their next output)."""
        return grid[gid, np.minimum(i_out, T - 1)] if land_rows else t_end

    if land_rows:
        target = row_target()

    def fail(mask, code: SolveStatus, message) -> None:
        """Rows in ``mask`` failed with ``code``: recorded, and raised for the first one (default)."""
        if not any_(mask):
            return
        if per_row:
            info.status[gid[mask]] = code
        else:
            info.status[0] = code
        if raise_on_failure:
            i = int(np.flatnonzero(mask)[0]) if per_row else 0
            ti = float(t[i]) if per_row else t
            where_ = f" of sample {int(gid[i])}" if per_row else ""
            raise code.error(message(i, where_, ti), t=ti)

    reuse = stepper.reuse
    host_ratio = getattr(stepper, "host_ratio", None)  # a compiled step computed the ratio already
    k1 = vf.at(t, z)
    if opts.first_step is not None or not norm.covers_all:
        _check_start(t, z, k1, per_row, fail)
        h = minimum(abs(float(opts.first_step)), abs(t_end - t)) if opts.first_step is not None else None
    else:
        h = None
    if h is None:
        h = initial_step_size(vf, t, z, k1, d, abs(target - t), stepper.tab.control_order, norm,
                              lambda: _check_start(t, z, k1, per_row, fail))
    if per_row and info.status.any():
        keep = info.status[gid] == SolveStatus.SUCCESS
        z, k1, t, t_end, h, prev, i_out, n_bad, gid = _compact(keep, stepper, z, k1, t, t_end, h, prev, i_out, n_bad, gid)
        target = row_target()
        if gid.size == 0:
            return
    elif not per_row and info.status[0]:
        return
    if reuse and not per_row:
        stepper.set_k1(k1.view(stepper.shape))
        k1 = None
    if record is not None:
        record.bounds.append(t)
        record.k1_time.append(t)
    n_trials = 0
    mns = opts.max_num_steps
    stop, max_nfe = opts.stop, opts.max_nfe
    cbs = opts.callbacks
    bounded = opts.min_step > 0 or opts.max_step < math.inf
    if bounded:
        h = clip(h, opts.min_step, opts.max_step)
    with np.errstate(all="ignore"):
        while True:
            if stop is not None:
                check_stop(stop, t)
            remaining = d * (target - t)
            landing = 1.01 * h >= remaining  # stretch by <= 1% rather than leave a sliver (dopri5.f)
            t_new = where(landing, target, t + d * h)
            hs = t_new - t
            ahs = abs(hs)
            tiny = (t_new == t) | (ahs <= _EPS4 * maximum(abs(t), abs(t_new)))
            n_trials += 1
            over = n_trials > mns
            if over or any_(tiny):
                if any_(tiny):
                    tiny_bad = tiny & (n_bad > 0)
                    if any_(tiny_bad):
                        fail(tiny_bad, SolveStatus.NON_FINITE, lambda i, s, ti: (
                            f"NaN/inf in every trial step{s} from t={ti:g}: the state or its derivative is not "
                            f"finite even for tiny steps{getattr(stepper, 'failure_note', '')}"))
                    tiny_ok = tiny & (n_bad == 0)
                    if any_(tiny_ok):
                        fail(tiny_ok, SolveStatus.STEP_UNDERFLOW, lambda i, s, ti: (
                            f"step size {float(ahs[i] if per_row else ahs):.3g}{s} underflowed at t={ti:g} (the "
                            f"problem may be stiff or singular there; loosen rtol/atol or use a fixed-step method)"))
                if over:
                    everyone = np.ones(gid.size, dtype=bool) if per_row else True
                    fail(everyone & ~tiny if per_row else not tiny, SolveStatus.MAX_NUM_STEPS, lambda i, s, ti: (
                        f"max_num_steps={mns} trial steps reached{s} at t={ti:g} before t1="
                        f"{float(t_end[i] if per_row else t_end):g}; raise options['max_num_steps'] or loosen "
                        f"rtol/atol"))
                if not per_row:
                    return
                keep = info.status[gid] == SolveStatus.SUCCESS
                z, k1, t, t_end, h, prev, i_out, n_bad, gid = _compact(
                    keep, stepper, z, k1, t, t_end, h, prev, i_out, n_bad, gid)
                target = row_target()
                if gid.size == 0:
                    return
                continue
            # just before a jump in the field's own time dtype (a float64 neighbour rounds back onto
            # the jump in float32, and the step would see the far side: rejected over and over)
            t_eval_end = next_time(t_new, t, vf.t_dtype) if is_jump and landing else t_new
            if cbs is not None:
                cbs.step(t, z, hs)
            z_new = stepper.step(vf, t, t_new, t_eval_end, z, k1)
            if max_nfe is not None and vf.nfe > max_nfe:  # the budget is shared: every active row stops
                fail(np.ones(gid.size, dtype=bool) if per_row else True, SolveStatus.NFE_BUDGET,
                     lambda i, s, ti: budget_message(vf, max_nfe, ti, s))
                return
            with torch.no_grad():
                if host_ratio is not None:
                    ratio = host_ratio(norm, z, z_new)  # the one host sync of the step
                else:
                    err, err3, scale = stepper.error()
                    ratio = scale * norm.ratio(z, z_new, err, err3)  # the one host sync of the step
            accept, h_next, prev = ctrl.adapt(ahs, ratio, prev)
            if bounded:
                accept = accept | (ahs <= opts.min_step)
                h_next = clip(h_next, opts.min_step, opts.max_step)
            if cbs is not None:
                cbs.decided(t, z, hs, accept)
            finite = isfinite(ratio)
            n_bad = where(finite, 0, n_bad + 1)
            h = h_next
            n_acc = count(accept)
            info.accepted += n_acc
            info.rejected += (gid.size if per_row else 1) - n_acc
            failed = n_bad > MAX_NONFINITE_RETRIES
            if any_(failed):
                fail(failed, SolveStatus.NON_FINITE, lambda i, s, ti: (
                    f"NaN/inf in the state or derivative{s} of {int(n_bad[i] if per_row else n_bad)} consecutive "
                    f"trial steps from t={ti:g} (last h={float(ahs[i] if per_row else ahs):.3g})"
                    f"{getattr(stepper, 'failure_note', '')}"))
                if not per_row:
                    return
            done = False
            if n_acc:
                info.last_step = float(ahs[accept].max()) if per_row else ahs
                if record is not None:
                    record.starts.append(z)
                    record.bounds.append(t_new)
                    record.eval_end.append(t_eval_end)
                # outputs crossed by accepted rows: the times in (t, t_new]
                nxt = grid[gid, i_out] if per_row else times[i_out]
                crossed = accept & (d * (nxt - t_new) <= 0)
                if any_(crossed):
                    i_out = _write_outputs(crossed, grid, gid, i_out, t, t_new, z, z_new, d, stepper, vf, pieces,
                                           record)
                if not per_row:  # the one row was accepted
                    info.next_step = h
                    t, z = t_new, z_new
                    if landing:
                        i_stop += 1
                        if i_stop == len(stops):
                            return
                        landed_jump = is_jump
                        target, is_jump = stops[i_stop]
                        if landed_jump:
                            # the field may jump here: restart from its right-hand value
                            k1_time = next_time(t, t_end, vf.t_dtype)
                            k1 = vf.at(k1_time, z).view(stepper.shape)
                            if reuse:
                                stepper.set_k1(k1)
                                k1 = None
                            if record is not None:
                                record.k1_time.append(k1_time)
                            continue
                    if record is not None:
                        record.k1_time.append(t)
                    k1 = stepper.last_stage if stepper.fsal else vf.at(t, z).view(stepper.shape)
                    if reuse:
                        stepper.set_k1(k1)
                        k1 = None
                    continue
                # per row: accepted rows advance, rejected rows keep their state
                if n_acc == gid.size:
                    t, z = t_new, z_new
                    k1 = stepper.last_stage if stepper.fsal else vf.at(t, z)
                else:
                    acc_col = to_device(accept, z.device).unsqueeze(1)
                    t = where(accept, t_new, t)
                    z = torch.where(acc_col, z_new, z)
                    k1 = torch.where(acc_col, stepper.last_stage, k1) if stepper.fsal else vf.at(t, z)
                done = accept & landing  # landed on t_end: every output written
                if land_rows:  # landed on an output time; the end only if it is t_end
                    done &= t_new == t_end
                    target = row_target()
            elif not per_row:
                continue
            if any_(done) or any_(failed):
                keep = not_(done) & (info.status[gid] == SolveStatus.SUCCESS)
                z, k1, t, t_end, h, prev, i_out, n_bad, gid = _compact(
                    keep, stepper, z, k1, t, t_end, h, prev, i_out, n_bad, gid)
                target = row_target()
                if gid.size == 0:
                    return


def _write_outputs(crossed, grid, gid, i_out, t, t_new, z, z_new, d, stepper, vf, pieces, record):
    """Append the outputs of the rows in ``crossed`` at their times in (t, t_new] to ``pieces``
    (dense output inside the step, z_new exactly at its end); returns the updated ``i_out``."""
    per_row = stepper.per_row
    r = np.flatnonzero(crossed) if per_row else np.zeros(1, dtype=np.int64)
    i0 = i_out[r] if per_row else np.array([i_out])
    t_r, tn_r = (t[r], t_new[r]) if per_row else (np.array([t]), np.array([t_new]))
    row_times = grid[gid[r]]  # (R, T)
    reached = (d * row_times <= d * tn_r[:, None]).sum(1)  # outputs at or before t_new
    cnt = reached - i0
    rr = np.repeat(np.arange(r.size), cnt)
    jj = np.repeat(i0 - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))
    tj = row_times[rr, jj]
    at_end = tj == tn_r[rr]
    inside = ~at_end
    n = len(record.starts) - 1 if record is not None else 0
    if inside.any():
        theta = (tj[inside] - t_r[rr[inside]]) / (tn_r[rr[inside]] - t_r[rr[inside]])
        vals = stepper.dense(vf, t, t_new, z, theta, rows=r[rr[inside]] if per_row else None)
        pieces.append((jj[inside], gid[r[rr[inside]]], vals))
        if record is not None:
            record.outputs.extend((n, float(th)) for th in theta)
    if at_end.any():
        ends = r[rr[at_end]]
        vals = z_new.index_select(0, to_device(ends, z.device)) if per_row else z_new.unsqueeze(0)
        pieces.append((jj[at_end], gid[ends], vals))
        if record is not None:
            record.outputs.append((n, None))
    if not per_row:
        return int(reached[0])
    i_out = i_out.copy()
    i_out[r] = reached
    return i_out


def _check_start(t, z, k1, per_row, fail) -> None:
    """Rows whose y0 or f(t0, y0) is NaN/inf fail with NON_FINITE (one host sync)."""
    zb = ~torch.isfinite(z.detach()).all(-1)
    fb = ~torch.isfinite(k1.detach()).reshape(z.shape).all(-1)
    flags = torch.stack([zb, fb]).cpu().numpy()
    bad = flags[0] | flags[1]
    if not bad.any():
        return
    fail(bad if per_row else True, SolveStatus.NON_FINITE, lambda i, s, ti: (
        f"the {'initial state y0' if flags[0].reshape(-1)[i] else 'derivative f(t0, y0)'}{s} contains NaN/inf "
        f"at t={ti:g}"))


def _compact(keep, stepper, z, k1, t, *host):
    """Only the rows in ``keep`` stay active: device rows by one index_select, host arrays by mask."""
    idx = to_device(np.flatnonzero(keep), z.device)
    z, k1 = z.index_select(0, idx), k1.index_select(0, idx)
    if idx.numel():
        stepper.resize(z.shape)
    return (z, k1, t[keep], *(x[keep] for x in host))
