"""node_engine: Neural ODE numerics on PyTorch — ODE solvers with error control and dense output,
the adjoint method, and solver statistics (models, data sets and trainers live in subpackages and
are imported on demand, not here)."""

from .adjoint import odeint_adjoint
from .errors import (
    CheckpointError,
    DatasetError,
    MaxNumStepsError,
    NonFiniteLossError,
    NonFiniteStateError,
    ODEForgeError,
    SolverError,
    SolveStatus,
    StepSizeUnderflowError,
    TrainingError,
)
from .events import odeint_event
from .odeint import odeint
from .solvers.compile import compile_field
from .stats import SolverStats

__all__ = [
    "odeint",
    "odeint_adjoint",
    "odeint_event",
    "compile_field",
    "SolverStats",
    "ODEForgeError",
    "SolverError",
    "SolveStatus",
    "StepSizeUnderflowError",
    "MaxNumStepsError",
    "NonFiniteStateError",
    "TrainingError",
    "NonFiniteLossError",
    "DatasetError",
    "CheckpointError",
]
