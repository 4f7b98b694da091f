"""Per-call limits on the ODE solves a model makes: an NFE budget and a stop signal.

A served model (``node_engine.inference``) or an evaluation makes its solves deep inside model code;
the caller that owns the budget (an API request with a deadline, a job that may be cancelled) is far
above it. :func:`solve_limits` sets the limits for the current thread (a ``contextvars`` variable,
so concurrent threads or tasks each see their own) and ``SolverSection.solver_options`` -- the one
place a model turns its solver section into ``odeint`` options -- adds them as the options
``max_nfe`` (per solve: ``NFEBudgetExceeded``, or per row ``SolveStatus.NFE_BUDGET`` when failures
are statuses) and ``stop`` (``SolveCancelled``), so every model honours them without knowing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

__all__ = ["SolveLimits", "solve_limits", "current_limits"]


@dataclass(frozen=True)
class SolveLimits:
    """``max_nfe``: field evaluations allowed per solve (None: no budget); ``stop``: a cheap
    zero-argument callable polled before every trial step, True ends the solve (None: never)."""

    max_nfe: int | None = None
    stop: Callable[[], bool] | None = None

    def options(self) -> dict[str, Any]:
        """The ``odeint`` options these limits add (only the ones set)."""
        out: dict[str, Any] = {}
        if self.max_nfe is not None:
            out["max_nfe"] = int(self.max_nfe)
        if self.stop is not None:
            out["stop"] = self.stop
        return out


_LIMITS: ContextVar[SolveLimits | None] = ContextVar("odeforge_solve_limits", default=None)


def current_limits() -> SolveLimits | None:
    """The limits set by the innermost :func:`solve_limits` of this thread/task, or None."""
    return _LIMITS.get()


@contextmanager
def solve_limits(max_nfe: int | None = None, stop: Callable[[], bool] | None = None) -> Iterator[SolveLimits]:
    """Every solve made inside the block (this thread/task only) gets ``max_nfe`` and ``stop``.

    Raises:
        ValueError: ``max_nfe`` not a positive int, ``stop`` not callable.
    """
    if max_nfe is not None and (isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < 1):
        raise ValueError(f"max_nfe must be a positive int or None, got {max_nfe!r}")
    if stop is not None and not callable(stop):
        raise ValueError(f"stop must be a zero-argument callable or None, got {stop!r}")
    limits = SolveLimits(max_nfe, stop)
    token = _LIMITS.set(limits)
    try:
        yield limits
    finally:
        _LIMITS.reset(token)
