"""``method="scipy_solver"``: :func:`scipy.integrate.solve_ivp` behind ``odeint`` (as torchdiffeq).

For reference solutions and stiff problems on the CPU, not for training: the solve runs in float64
numpy on the host (the state is copied there and back at every field call) and builds no autograd
graph, so gradients come only through ``odeint_adjoint`` (whose backward solve then runs in scipy
too). ``options["solver"]``: one of :data:`SCIPY_SOLVERS` (default ``"LSODA"``, torchdiffeq's);
``min_step`` (LSODA only) and ``max_step`` go to solve_ivp; the output times are ``t_eval`` (each
solver's own dense output). A failed solve raises :class:`~node_engine.errors.SolverError` with
scipy's message. Not part of the job-spec method list (``node_engine.solvers.METHODS``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ..errors import SolverError

__all__ = ["SCIPY_METHOD", "SCIPY_SOLVERS", "SCIPY_OPTIONS", "solve_scipy"]

SCIPY_METHOD = "scipy_solver"
SCIPY_SOLVERS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")
SCIPY_OPTIONS = ("solver", "min_step", "max_step", "first_step", "norm", "dtype")


def _np_tol(x):
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else float(x)


def solve_scipy(vf, z0: torch.Tensor, times: list[float], info, options: dict, rtol, atol) -> torch.Tensor:
    """(T, N) states at ``times`` of z' = vf(t, z) from z0 (N,) by ``solve_ivp``.

    Raises:
        ValueError: unknown ``options["solver"]``. SolverError: solve_ivp reported a failure.
    """
    solver = options.get("solver", "LSODA")
    if solver not in SCIPY_SOLVERS:
        raise ValueError(f"options['solver'] must be one of {', '.join(SCIPY_SOLVERS)}, got {solver!r}")
    info.status = np.zeros(1, dtype=np.int64)
    if len(times) == 1:
        return z0.unsqueeze(0)
    shape, dev, dtype = vf.work_shape, z0.device, z0.dtype

    def fun(t, y):
        with torch.no_grad():
            z = torch.from_numpy(y).to(dev, dtype)
            return vf.at(float(t), z).reshape(-1).detach().cpu().double().numpy()

    kw = {}
    if options.get("max_step", math.inf) < math.inf:
        kw["max_step"] = float(options["max_step"])
    if solver == "LSODA" and options.get("min_step", 0.0) > 0:
        kw["min_step"] = float(options["min_step"])
    if options.get("first_step") is not None:
        kw["first_step"] = abs(float(options["first_step"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scipy's "rtol too small" notice: it clamps
        sol = __import__("scipy.integrate", fromlist=["solve_ivp"]).solve_ivp(
            fun, (times[0], times[-1]), z0.detach().reshape(-1).cpu().double().numpy(), method=solver,
            t_eval=np.asarray(times), rtol=_np_tol(rtol), atol=_np_tol(atol), **kw)
    if sol.status != 0 or sol.y.shape[1] != len(times):
        raise SolverError(f"scipy_solver ({solver}) failed: {sol.message}", t=float(sol.t[-1]) if sol.t.size else None)
    info.accepted += int(sol.nfev)  # solve_ivp reports evaluations, not steps
    del shape
    return torch.from_numpy(np.ascontiguousarray(sol.y.T)).to(dev, dtype)
