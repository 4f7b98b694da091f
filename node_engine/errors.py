"""Named exceptions of node_engine.

Every failure a job can record has its own class, so the worker stores ``type(exc).__name__`` and
``str(exc)`` and a user sees *why* a solve or a training run stopped. User mistakes (bad ``t``,
unknown method) stay ``ValueError`` subclasses so ordinary ``except ValueError`` code keeps working.
"""

from __future__ import annotations

from enum import IntEnum


class ODEForgeError(Exception):
    """Base class of every error raised on purpose by node_engine."""


class SolverError(ODEForgeError, RuntimeError):
    """An ODE solve could not reach the requested accuracy or produced a non-finite state.

    Attributes:
        t: the time (float, in the units of ``t``) at which the solver stopped, if known.
    """

    def __init__(self, message: str, *, t: float | None = None):
        super().__init__(message)
        self.t = t


class StepSizeUnderflowError(SolverError):
    """The adaptive step size fell below the smallest step that still moves ``t`` (floating point)."""


class MaxNumStepsError(SolverError):
    """More than ``max_num_steps`` steps (accepted + rejected) were taken."""


class NonFiniteStateError(SolverError):
    """The state or its derivative became NaN/inf and shrinking the step did not help."""


class NFEBudgetExceeded(SolverError):
    """More than ``options["max_nfe"]`` evaluations of the field were made (a compute bound set
    by the caller, e.g. a deployment's per-solve budget; checked after every trial step)."""


class SolveCancelled(SolverError):
    """``options["stop"]()`` returned True: the caller asked the solve to end (a cancelled job, a
    wall-clock or memory limit). Always raised, whatever ``raise_on_failure`` says."""


class SolveStatus(IntEnum):
    """Outcome of one row of a solve (``SolverStats.status`` holds one per row, int64).

    Values are stable (stored and compared as ints): SUCCESS=0, MAX_NUM_STEPS=1, STEP_UNDERFLOW=2,
    NON_FINITE=3 (the status codes of torchode's ``Status``), NFE_BUDGET=4 (``max_nfe`` reached; every
    row still active then gets it). :attr:`error` is the named exception a
    failure raises by default (``options["raise_on_failure"]=True``).
    """

    SUCCESS = 0
    MAX_NUM_STEPS = 1
    STEP_UNDERFLOW = 2
    NON_FINITE = 3
    NFE_BUDGET = 4

    @property
    def error(self) -> type[SolverError] | None:
        """The exception class of this status (None for SUCCESS)."""
        return _STATUS_ERRORS.get(self)


_STATUS_ERRORS = {
    SolveStatus.MAX_NUM_STEPS: MaxNumStepsError,
    SolveStatus.STEP_UNDERFLOW: StepSizeUnderflowError,
    SolveStatus.NON_FINITE: NonFiniteStateError,
    SolveStatus.NFE_BUDGET: NFEBudgetExceeded,
}


class TrainingError(ODEForgeError):
    """A training run stopped before its end for a reason inherent to the run."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or inf; the message names the step and the likely cause."""


class DatasetError(ODEForgeError, ValueError):
    """A data set is unknown, missing on disk, or fails validation (shape, finiteness, size)."""


class CheckpointError(ODEForgeError, ValueError):
    """A checkpoint is corrupted, tampered with, or does not match the model it is loaded into."""


class NewtonConvergenceError(SolverError):
    """The Newton iteration of an implicit method's stage equations did not converge (issue 16)."""
