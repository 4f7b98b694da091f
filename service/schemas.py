"""Pydantic request/response schemas of the HTTP API (apart from the SQLAlchemy tables in ``db.py``).

Every request model forbids unknown fields and bounds every number, so a typo (``"lerning_rate"``)
or an absurd value (``rtol = 0``) is a 422 naming the field, never a job that fails an hour later.
Defaults follow the job spec in ``docs/architecture.md``; ``{"model": {"type": "cnf"},
"dataset": {"name": "moons"}}`` is a complete job.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from node_engine.solvers import ADAPTIVE, FIXED, METHODS

Finite = Annotated[float, Field(allow_inf_nan=False)]
Tol = Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]

DENSITY_MODELS = ("cnf", "planar")
CLASSIFIER_MODELS = ("odenet", "resnet", "rknet", "mlp")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- model ------------------------------------------------------------------------------------
class CNFModel(Strict):
    """Continuous normalizing flow (FFJORD, Grathwohl et al. 2019): dz/dt = f(z, t), d log p/dt = -tr(df/dz)."""

    type: Literal["cnf"]
    hidden_dims: list[Annotated[int, Field(ge=1, le=1024)]] = Field(default=[64, 64, 64], min_length=1, max_length=8)
    nonlinearity: Literal["tanh", "softplus"] = "tanh"
    num_blocks: int = Field(1, ge=1, le=10)
    vector_field: Literal["concatsquash", "planar"] = "concatsquash"
    planar_width: int = Field(16, ge=1, le=1024)
    trace_estimator: Literal["exact", "hutchinson"] = "exact"
    noise: Literal["rademacher", "gaussian"] = "rademacher"
    end_time: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False)
    train_end_time: bool = True
    kinetic_energy: float = Field(0.0, ge=0.0, le=1e3, allow_inf_nan=False)
    jacobian_norm: float = Field(0.0, ge=0.0, le=1e3, allow_inf_nan=False)


class PlanarModel(Strict):
    """Discrete planar flow (Rezende & Mohamed 2015) with ``num_layers`` layers."""

    type: Literal["planar"]
    num_layers: int = Field(8, ge=1, le=256)


class ODENetModel(Strict):
    """ODE-Net (Chen et al. 2018) or its RK-Net variant (backprop through a fixed-step RK solve)."""

    type: Literal["odenet", "rknet"]
    channels: int = Field(64, ge=1, le=512)


class ResNetModel(Strict):
    """Residual network baseline with ``num_blocks`` residual blocks."""

    type: Literal["resnet"]
    channels: int = Field(64, ge=1, le=512)
    num_blocks: int = Field(6, ge=1, le=64)


class MLPModel(Strict):
    """One-hidden-layer perceptron baseline (Chen et al. 2018, Table 1)."""

    type: Literal["mlp"]
    hidden: int = Field(300, ge=1, le=4096)


ModelSpec = Annotated[
    Union[CNFModel, PlanarModel, ODENetModel, ResNetModel, MLPModel], Field(discriminator="type")
]


# ---- dataset ----------------------------------------------------------------------------------
def dataset_kind(name: str) -> str | None:
    """``density``, ``energy`` or ``classification`` from node_engine's registry; None if unknown."""
    from node_engine.datasets import DATASETS  # the one registry of names (imported lazily: torch)

    entry = DATASETS.get(name)
    return entry.kind if entry is not None else None


def known_datasets() -> list[str]:
    from node_engine.datasets import DATASETS

    return sorted(DATASETS)


class DatasetSpec(Strict):
    """A registry data set (generated with ``n_samples``/``seed``) or ``{"name": "upload", "id": ...}``."""

    name: str = Field(min_length=1, max_length=64)
    n_samples: int = Field(20_000, ge=10, le=1_000_000)
    test_fraction: float = Field(0.2, ge=0.01, le=0.9, allow_inf_nan=False)
    seed: Seed = 0
    id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$", description="uploaded data set id (name 'upload' only)")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if dataset_kind(v) is None:
            raise ValueError(f"unknown data set {v!r}; known: {', '.join(known_datasets())}")
        return v

    @model_validator(mode="after")
    def _upload_needs_id(self) -> "DatasetSpec":
        if self.name == "upload" and self.id is None:
            raise ValueError("dataset 'upload' needs the 'id' returned by POST /v1/datasets")
        if self.name != "upload" and self.id is not None:
            raise ValueError("'id' is only allowed with dataset name 'upload'")
        return self


# ---- solver -----------------------------------------------------------------------------------
# The method names node_engine implements (its one registry), as an enum in the OpenAPI schema.
SolverMethod = Literal[tuple(sorted(METHODS))]  # type: ignore[valid-type]


class SolverSpec(Strict):
    """ODE solver options (torchdiffeq names). Tolerances are per-step local error, mixed rel/abs."""

    method: SolverMethod = "dopri5"
    rtol: Tol = 1e-5
    atol: Tol = 1e-5
    adjoint: bool = True
    adjoint_norm: Literal["seminorm", "default"] = "seminorm"
    adjoint_mode: Literal["backsolve", "checkpoint"] = "backsolve"
    step_size: float | None = Field(None, gt=0.0, le=100.0, allow_inf_nan=False, description="fixed-grid step")
    max_num_steps: int = Field(10_000, ge=1, le=1_000_000)
    eval_rtol: Tol | None = None
    eval_atol: Tol | None = None


# ---- training ---------------------------------------------------------------------------------
class TrainingSpec(Strict):
    """Optimisation loop (Adam). Exactly one of ``iterations`` / ``epochs``; default 1000 iterations."""

    iterations: int | None = Field(None, ge=1, le=1_000_000)
    epochs: int | None = Field(None, ge=1, le=10_000)
    batch_size: int = Field(512, ge=1, le=65_536)
    lr: float = Field(1e-3, gt=0.0, le=10.0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    seed: Seed = 0
    eval_every: int = Field(100, ge=1, le=1_000_000)
    checkpoint_every: int = Field(100, ge=1, le=1_000_000)
    log_every: int = Field(1, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _one_length(self) -> "TrainingSpec":
        if self.iterations is not None and self.epochs is not None:
            raise ValueError("give either 'iterations' or 'epochs', not both")
        if self.iterations is None and self.epochs is None:
            self.iterations = 1000
        return self


class JobCreate(Strict):
    """Body of ``POST /v1/jobs``: what to train, on what, with which solver."""

    model: ModelSpec
    dataset: DatasetSpec
    solver: SolverSpec = Field(default_factory=SolverSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)

    @model_validator(mode="after")
    def _model_fits_data(self) -> "JobCreate":
        classifier = self.model.type in CLASSIFIER_MODELS
        image_data = dataset_kind(self.dataset.name) == "classification"
        if classifier and not image_data:
            raise ValueError(f"model {self.model.type!r} is a classifier; {self.dataset.name!r} is not a "
                             f"classification data set")
        if not classifier and image_data:
            raise ValueError(f"model {self.model.type!r} is a density model; {self.dataset.name!r} is a classification data set")
        # Caught here, not in the worker: a CNF on a fixed grid has no step size to fall back on
        # (the classifiers default to RK-Net's step 0.1; planar flows use no solver).
        if self.model.type == "cnf" and self.solver.method in FIXED and self.solver.step_size is None:
            raise ValueError(f"solver.step_size: method {self.solver.method!r} is fixed-step and needs a step size "
                             f"(adaptive methods need none: {', '.join(sorted(ADAPTIVE))})")
        return self


# ---- responses --------------------------------------------------------------------------------
class JobError(BaseModel):
    type: str = Field(description="exception class, e.g. MaxNumStepsError")
    detail: str


class JobPublic(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: float = Field(ge=0.0, le=1.0)
    step: int
    total_steps: int | None
    spec: dict[str, Any]
    metrics: dict[str, Any] = Field(description="latest values: num_parameters, loss, test_nll (nats), ...")
    error: JobError | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobsPublic(BaseModel):
    jobs: list[JobPublic]
    next_page_token: str | None


class MetricsPublic(BaseModel):
    history: list[dict[str, Any]] = Field(description="one row per logged step: step, loss, nfe_forward, nfe_backward, ...")
    next_page_token: str | None


class CheckpointInfo(BaseModel):
    name: str
    size_bytes: int
    url: str


class CheckpointsPublic(BaseModel):
    checkpoints: list[CheckpointInfo]


class LogDensityRequest(Strict):
    points: list[list[Finite]] = Field(min_length=1, max_length=100_000, description="(N, D) in data coordinates")


class LogDensityResponse(BaseModel):
    log_density: list[float] = Field(description="(N,) log p(x) in nats")
    nfe: int = Field(description="vector-field evaluations used")
    checkpoint: str


class SamplesRequest(Strict):
    n: int = Field(1000, ge=1, le=100_000)
    seed: Seed = 0


class SamplesResponse(BaseModel):
    samples: list[list[float]] = Field(description="(n, D) in data coordinates")
    checkpoint: str


class PredictRequest(Strict):
    inputs: list[Any] = Field(min_length=1, description="N x C x H x W or N x H x W pixel values")


class PredictResponse(BaseModel):
    probabilities: list[list[float]] = Field(description="(N, 10) class probabilities")
    checkpoint: str


class DatasetPublic(BaseModel):
    id: str
    shape: list[int]


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, str]] | None = Field(None, description="field-level reasons: {field, reason}")


def job_public(job: Any) -> JobPublic:
    """The public view of a ``service.db.Job`` row (internals such as the fencing token stay hidden)."""
    return JobPublic(
        id=job.id,
        status=job.status,
        progress=max(0.0, min(1.0, job.progress or 0.0)),
        step=job.step or 0,
        total_steps=job.total_steps,
        spec=job.spec,
        metrics=job.metrics or {},
        error=JobError(type=job.error_type, detail=job.error_detail or "") if job.error_type else None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )
