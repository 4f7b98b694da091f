"""torchdiffeq's per-step callbacks on ``func`` and user-supplied error norms.

Callbacks: a ``func`` may carry ``callback_step(t0, y0, dt)`` (called before every trial step),
``callback_accept_step`` / ``callback_reject_step`` (after the controller's decision; adaptive
methods only) and the same names with ``_adjoint`` appended, which the backsolve adjoint's backward
solve calls (there ``y0`` is the flat augmented state [y, a, a_θ]). ``t0`` and ``dt`` arrive as 0-d
float64 tensors, ``y0`` in the user's layout (a tuple for a tuple state), as in torchdiffeq.

Norms: ``options["norm"]`` replaces the RMS of the weighted error by ``norm(v)``, v = err / (atol +
rtol·max(|y0|, |y1|)) in the user's layout; it must be absolutely homogeneous (every norm is), as
the solver applies it to the error estimate before the factor |h|.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .norms import ErrorNorm

__all__ = ["StepCallbacks", "find_callbacks", "CallableNorm"]

NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")


class StepCallbacks:
    """The callbacks found on ``func`` (None where absent) and how to show the state to them."""

    __slots__ = ("step_fn", "accept_fn", "reject_fn", "view")

    def __init__(self, step_fn, accept_fn, reject_fn, view):
        self.step_fn, self.accept_fn, self.reject_fn, self.view = step_fn, accept_fn, reject_fn, view

    @staticmethod
    def _args(t, z, h):
        return (torch.scalar_tensor(float(t), dtype=torch.float64), z,
                torch.scalar_tensor(float(h), dtype=torch.float64))

    def step(self, t, z, h) -> None:
        if self.step_fn is not None:
            self.step_fn(*self._args(t, self.view(z), h))

    def decided(self, t, z, h, accept) -> None:
        fn = self.accept_fn if accept else self.reject_fn
        if fn is not None:
            fn(*self._args(t, self.view(z), h))


def find_callbacks(func, view, *, adaptive: bool, suffix: str = "", method: str = "") -> StepCallbacks | None:
    """The :class:`StepCallbacks` on ``func`` with names ending in ``suffix`` ("" forward,
    "_adjoint" backward), or None when it has none. Accept/reject callbacks on a fixed-grid
    method are never called: a UserWarning says so (as torchdiffeq)."""
    fns = [getattr(func, name + suffix, None) for name in NAMES]
    if not adaptive and (fns[1] is not None or fns[2] is not None):
        warnings.warn(f"method {method!r} is fixed-grid: callback_accept_step/callback_reject_step{suffix} "
                      f"are never called (callback_step is)", stacklevel=3)
        fns[1] = fns[2] = None
    if all(f is None for f in fns):
        return None
    return StepCallbacks(*fns, view)


class CallableNorm(ErrorNorm):
    """:class:`ErrorNorm` whose size of the weighted error is ``fn(v)`` for a flat (N,) ``v``
    (``fn`` unflattens it for the user's norm) instead of the mixed RMS. Joint solves only."""

    def __init__(self, rtol, atol, fn):
        super().__init__(rtol, atol)
        self.fn = fn
        self.covers_all = False  # the start is checked for NaN/inf explicitly

    def rms(self, v: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.fn(v), dtype=v.dtype, device=v.device).reshape(())

    def ratio(self, y0, y1, err, err3=None):
        """As :meth:`ErrorNorm.ratio` (dopri8's second estimate is not used)."""
        s = self.scale(y0, y1)
        r = self.fn(err.div_(s))
        return float(r) if np.ndim(r) == 0 else float(torch.as_tensor(r).max())
