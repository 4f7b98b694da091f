"""node_engine: Neural ODE numerics on PyTorch — ODE solvers with error control and dense output,
the adjoint method, and solver statistics (models, data sets and trainers live in subpackages and
are imported on demand, not here). ``load_model`` (a trained checkpoint, from a path or bytes, for
log-density, samples, predict or forecast) is imported on first use."""

from .adjoint import odeint_adjoint
from .errors import (
    CheckpointError,
    DatasetError,
    MaxNumStepsError,
    NFEBudgetExceeded,
    NonFiniteLossError,
    NonFiniteStateError,
    ODEForgeError,
    SolveCancelled,
    SolverError,
    SolveStatus,
    StepSizeUnderflowError,
    TrainingError,
)
from .dense import odeint_dense
from .events import odeint_event
from .odeint import odeint
from .solvers.compile import compile_field
from .stats import SolverStats

__all__ = [
    "odeint",
    "odeint_adjoint",
    "odeint_event",
    "odeint_dense",
    "compile_field",
    "SolverStats",
    "ODEForgeError",
    "SolverError",
    "SolveStatus",
    "StepSizeUnderflowError",
    "MaxNumStepsError",
    "NonFiniteStateError",
    "NFEBudgetExceeded",
    "SolveCancelled",
    "TrainingError",
    "NonFiniteLossError",
    "DatasetError",
    "CheckpointError",
    "load_model",
]


def __getattr__(name: str):
    # ``from node_engine import load_model`` without importing every model family on ``import node_engine``
    if name == "load_model":
        from .inference import load_model

        return load_model
    raise AttributeError(f"module 'node_engine' has no attribute {name!r}")
