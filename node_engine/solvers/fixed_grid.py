"""Fixed-grid integration: one step per grid interval; the grid always contains the output times,
so outputs are exact step ends (no interpolation error added to the method's own)."""

from __future__ import annotations

import math

import torch

from ..errors import NFEBudgetExceeded, NonFiniteStateError, SolveStatus
from .adaptive import SolveInfo, StepRecord, budget_message, check_stop, over_budget
from .rk import RKStepper
from .rows import next_time

__all__ = ["make_grid", "integrate_fixed"]


def make_grid(times: list[float], step_size: float | None, grid: list[float] | None) -> list[float]:
    """Step boundaries from ``times[0]`` to ``times[-1]``: the step_size lattice (or the user grid)
    merged with the output times, ordered in the direction of integration.

    Raises ValueError: step_size <= 0, or a grid that does not cover [t0, t1].
    """
    t0, t1 = times[0], times[-1]
    d = 1.0 if t1 >= t0 else -1.0
    pts = set(times)
    if step_size is not None:
        if not (step_size > 0 and math.isfinite(step_size)):
            raise ValueError(f"options['step_size'] must be a positive finite number, got {step_size}")
        n = math.ceil(abs(t1 - t0) / step_size * (1 - 1e-12))
        pts.update(t0 + d * k * step_size for k in range(n))
    elif grid is not None:
        g = list(grid)
        if len(g) < 2 or min(g) > min(t0, t1) or max(g) < max(t0, t1):
            raise ValueError("options['grid'] must cover the whole interval [t[0], t[-1]]")
        pts.update(x for x in g if d * (x - t0) > 0 and d * (t1 - x) > 0)
    return sorted(pts, key=lambda x: d * x)


def integrate_fixed(
    vf, z0: torch.Tensor, times: list[float], stepper: RKStepper, grid: list[float], info: SolveInfo,
    record: StepRecord | None = None, *, max_nfe: int | None = None, stop=None, perturb: bool = False,
    callbacks=None,
) -> torch.Tensor:
    """States at ``times`` (all of them grid points): (T, N). Row 0 is z0 itself.

    ``stop`` is polled before every step (SolveCancelled); ``max_nfe`` is checked after every step
    (NFEBudgetExceeded), as in the adaptive loop.
    ``perturb`` (torchdiffeq's option): every step evaluates the field just inside its interval
    (first stage at nextafter(t_n) towards t_n+1, c = 1 stages at nextafter(t_n+1) towards t_n), so
    a field with discontinuities on grid points is sampled on the right side of each.
    ``callbacks``: a :class:`~.hooks.StepCallbacks`; ``callback_step`` is called before each step.
    """
    outs = [z0]
    i_out = 1
    T = len(times)
    z = z0
    k1 = None
    if record is not None:
        record.bounds.append(grid[0])
    shape = stepper.shape
    for t, t_new in zip(grid[:-1], grid[1:]):
        check_stop(stop, t)
        if perturb:
            t_k1, t_end_eval = next_time(t, t_new, vf.t_dtype), next_time(t_new, t, vf.t_dtype)
        else:
            t_k1, t_end_eval = t, t_new
        if callbacks is not None:
            callbacks.step(t, z, t_new - t)
        if k1 is None or not stepper.fsal or perturb:
            k1 = vf(t_k1, z.view(shape))
        if record is not None:
            record.starts.append(z)
            record.bounds.append(t_new)
            record.eval_end.append(t_end_eval)
            record.k1_time.append(t_k1)
        z = stepper.step(vf, t, t_new, t_end_eval, z, k1)
        if over_budget(vf, max_nfe):
            info.status[:] = SolveStatus.NFE_BUDGET
            raise NFEBudgetExceeded(budget_message(vf, max_nfe, t), t=t)
        k1 = stepper.last_stage.clone() if stepper.fsal else None
        info.accepted += 1
        info.last_step = abs(t_new - t)
        if i_out < T and times[i_out] == t_new:
            outs.append(z)
            if record is not None:
                record.outputs.append((len(record.starts) - 1, None))
            i_out += 1
    out = torch.stack(outs)
    finite = torch.isfinite(out).flatten(1).all(1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise NonFiniteStateError(f"the state became NaN/inf by t={times[i]:g} (fixed-step solve)", t=times[i])
    return out
