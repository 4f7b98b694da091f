"""``odeint_dense``: the solution on a whole interval, as an interpolant (torchdiffeq's ``odeint_dense``).

One adaptive solve from t0 to t1 records its accepted steps (start state and bounds: the
checkpoint adjoint's :class:`~node_engine.solvers.adaptive.StepRecord`); evaluating the returned
:class:`DenseSolution` at any times in [t0, t1] replays each step that holds one of them (the same
stages, bit for bit) and evaluates the method's continuous extension there (dopri5: Shampine's
order-4 dense output; tsit5, dopri8, bosh3: theirs). Nothing but the step starts is kept, so
memory is one state per step; a query costs one replayed step per distinct step it touches.
"""

from __future__ import annotations

import numpy as np
import torch

from .odeint import add_info, check_t, make_config, time_dtype
from .solvers import METHODS
from .solvers.adaptive import SolveInfo, StepRecord
from .solvers.rk import RKStepper
from .solvers.state import StateLayout, VectorField

__all__ = ["odeint_dense", "DenseSolution"]


class DenseSolution:
    """y(t) for any t in [t0, t1] of one solve: ``sol(t_eval)``.

    ``t_eval``: a float, a 0-d tensor (returns y0's shape) or a 1-D tensor/sequence of M times
    (returns (M, *y0.shape)); any order, repeats allowed. Raises ValueError for a time outside
    [t0, t1]. Gradients flow to y0 and the field's parameters when the solve was recorded with
    autograd on (the replayed steps start from the recorded states).
    """

    def __init__(self, tab, vf: VectorField, layout: StateLayout, record: StepRecord):
        self._tab, self._vf, self._layout, self._rec = tab, vf, layout, record
        self._bounds = np.asarray(record.bounds, dtype=np.float64)
        self.t0, self.t1 = float(self._bounds[0]), float(self._bounds[-1])
        self.n_steps = len(record.starts)

    def __call__(self, t_eval):
        scalar = not isinstance(t_eval, (list, tuple, np.ndarray)) and (
            not isinstance(t_eval, torch.Tensor) or t_eval.dim() == 0)
        ts = (t_eval.detach().cpu().double().reshape(-1).numpy() if isinstance(t_eval, torch.Tensor)
              else np.asarray(t_eval, dtype=np.float64).reshape(-1))
        d = 1.0 if self.t1 > self.t0 else -1.0
        lo, hi = min(self.t0, self.t1), max(self.t0, self.t1)
        if ts.size and (not np.all(np.isfinite(ts)) or ts.min() < lo or ts.max() > hi):
            raise ValueError(f"odeint_dense: times must lie in [{lo:g}, {hi:g}] (the solved interval), got "
                             f"[{ts.min():g}, {ts.max():g}]")
        # step n holds t when bounds[n] <= t < bounds[n+1] (in the direction of integration); t1 -> last step
        n_of = np.clip(np.searchsorted(d * self._bounds, d * ts, side="right") - 1, 0, self.n_steps - 1)
        rec, vf = self._rec, self._vf
        out: list[torch.Tensor | None] = [None] * ts.size
        for n in np.unique(n_of):
            idx = np.flatnonzero(n_of == n)
            a, b = rec.bounds[n], rec.bounds[n + 1]
            z = rec.starts[n]
            stepper = RKStepper(self._tab, vf.work_shape, z.device, z.dtype, reuse_buffer=False)
            k1 = vf(rec.k1_time[n], z.view(vf.work_shape))
            stepper.step(vf, a, b, rec.eval_end[n], z, k1)
            vals = stepper.dense(vf, a, b, z, (ts[idx] - a) / (b - a))
            for j, i in enumerate(idx):
                out[i] = vals[j]
        flat = torch.stack(out) if out else torch.empty(0, self._layout.numel, dtype=self._layout.dtype)
        y = self._layout.unflatten(flat)
        if scalar:
            return tuple(m[0] for m in y) if isinstance(y, tuple) else y[0]
        return y


def odeint_dense(func, y0, t0, t1, *, rtol=1e-7, atol=1e-9, method="dopri5", options=None, stats=None):
    """Solve y' = func(t, y), y(t0) = y0 on [t0, t1] and return the solution as a :class:`DenseSolution`.

    As torchdiffeq's ``odeint_dense`` (which takes dopri5 only): every explicit adaptive method of
    ``node_engine.solvers.ADAPTIVE`` with a continuous extension, joint step control, the options of
    ``odeint``. ``y0``: a tensor of any shape (or a tuple of tensors); t0, t1: floats or 0-d tensors.

    Raises:
        ValueError: another method (fixed-grid, implicit, kvaerno5, scipy_solver: no continuous
            extension to replay), per-sample step control, t0 == t1; the solve's named errors.
    """
    method = method or "dopri5"
    tab = METHODS.get(method)
    if tab is None or not tab.adaptive or tab.dense is None:
        raise ValueError(f"odeint_dense needs an explicit adaptive method with dense output "
                         f"({', '.join(n for n, m in METHODS.items() if m.adaptive and m.dense is not None)}), "
                         f"got {method!r}")
    layout = StateLayout(y0)
    ref = y0[0] if isinstance(y0, (tuple, list)) else y0
    t = torch.stack([torch.as_tensor(t0, dtype=torch.float64), torch.as_tensor(t1, dtype=torch.float64)]).reshape(2)
    times, t_dtype = check_t(t.to(ref.dtype) if ref.dtype.is_floating_point else t)
    cfg = make_config(method, rtol, atol, options, layout, func=func)
    if cfg.options.get("step_control", "joint") != "joint":
        raise ValueError("odeint_dense supports joint step control only")
    vf = VectorField(func, layout, time_dtype(cfg.options, t_dtype))
    info, record = SolveInfo(), StepRecord()
    try:
        cfg.solve(vf, layout.flatten(y0), times, info, record)
    finally:
        add_info(stats, info, vf, times=times)
    return DenseSolution(tab, vf, layout, record)
