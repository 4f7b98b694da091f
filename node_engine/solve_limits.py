"""Limits a caller puts on every ODE solve a block of code makes, without threading them through
models and families: ``with solve_limits(max_nfe=..., stop=...)``.

``SolverSection.solver_options`` (the one place models build ``odeint`` options) adds the current
limits to every solve's options (see :func:`node_engine.odeint` for ``max_nfe`` and ``stop``). The
limits live in a :class:`contextvars.ContextVar`, so they hold for the calling thread (or asyncio
task) only: a worker's training thread, or one inference request, never limits another's solves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["solve_limits", "current_limits"]

_LIMITS: ContextVar[dict[str, Any]] = ContextVar("node_engine_solve_limits", default={})


@contextmanager
def solve_limits(*, max_nfe: int | None = None, stop: Callable[[], bool] | None = None,
                 compile: bool | None = None, compile_auto: bool | None = None) -> Iterator[None]:
    """Every solve built from a spec inside the block gets ``options["max_nfe"]`` (NFE budget per
    solve; NFEBudgetExceeded) and ``options["stop"]`` (polled once per step; SolveCancelled).
    ``compile=True`` lets adaptive solves use a compiled trial step as the spec's
    ``solver.compile`` says (issue 17; a worker's training block sets it, served answers never do:
    a first compile takes seconds to minutes). ``compile_auto=False`` holds back the spec's
    ``"auto"`` (the trainer does while the rest of a job is too short to repay a compile); ``"on"``
    still compiles. None leaves a limit unset (an enclosing block's value is kept)."""
    new = dict(_LIMITS.get())
    if compile is not None:
        new["compile"] = bool(compile)
    if compile_auto is not None:
        new["compile_auto"] = bool(compile_auto)
    if max_nfe is not None:
        new["max_nfe"] = int(max_nfe)
    if stop is not None:
        new["stop"] = stop
    token = _LIMITS.set(new)
    try:
        yield
    finally:
        _LIMITS.reset(token)


def current_limits() -> dict[str, Any]:
    """The options of the innermost :func:`solve_limits` block (empty outside any)."""
    return dict(_LIMITS.get())
