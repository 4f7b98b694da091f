"""Pydantic request/response schemas of the HTTP API (apart from the SQLAlchemy tables in ``db.py``).

Every request model forbids unknown fields and bounds every number, so a typo (``"lerning_rate"``)
or an absurd value (``rtol = 0``) is a 422 naming the field, never a job that fails an hour later.
The job-spec schemas are built from ``node_engine.specs`` (``spec_field``, ``choices``), which owns
every default and bound; the family of the data set fills ``training.batch_size`` when it is null
(``node_engine.families``). ``{"model": {"type": "cnf"}, "dataset": {"name": "moons"}}`` is a
complete job.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from node_engine.solvers import ADAPTIVE, FIXED
from node_engine.specs import (
    CHECKPOINT_NAME_PATTERN,
    JOB_ID_PATTERN,
    RUN_NAME_MAX_CHARS,
    RUN_TAG_PATTERN,
    RUN_TAGS_MAX,
    CNFSection,
    DatasetSection,
    LatentODESection,
    MLPSection,
    NODESection,
    ODENetSection,
    PlanarSection,
    ResNetSection,
    RNNSection,
    SolverSection,
    TrainingSection,
)

Finite = Annotated[float, Field(allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def spec_field(section: type, name: str, **extra: Any) -> Any:
    """A pydantic ``Field`` with the default and bounds of ``section.name`` (``node_engine.specs``):
    the spec sections own every default and bound; the schema only restates them for OpenAPI."""
    f = section.__dataclass_fields__[name]
    meta = f.metadata
    default = extra.pop("default", f.default)
    kwargs: dict[str, Any] = {k: meta[k] for k in ("ge", "gt", "le", "lt") if k in meta}
    if isinstance(f.default, tuple):  # a list field: its items' bounds go on the item type
        kwargs = {"min_length": meta.get("min_items"), "max_length": meta.get("max_items")}
        return Field(list(default), **kwargs, **extra)  # pydantic copies a mutable default per instance
    if isinstance(f.default, float) or "gt" in meta or "lt" in meta:
        kwargs["allow_inf_nan"] = False
    if meta.get("doc") and "description" not in extra:
        extra["description"] = meta["doc"]
    return Field(default, **kwargs, **extra)


def choices(section: type, name: str) -> Any:
    """``Literal[...]`` of a section field's choices (an enum in the OpenAPI schema)."""
    return Literal[section.__dataclass_fields__[name].metadata["choices"]]  # type: ignore[valid-type]


def _items(section: type, name: str) -> Any:
    bounds = section.__dataclass_fields__[name].metadata["items"]
    return Annotated[int, Field(**bounds)]


class _SectionChecked(Strict):
    """Cross-field rules of a spec section (beyond per-field bounds) are the section's own
    ``__post_init__``; the schema runs it so such a spec is a 422, not a failed job."""

    SECTION: ClassVar[type | None] = None

    @model_validator(mode="after")
    def _section_rules(self) -> Any:
        if self.SECTION is not None:
            self.SECTION.from_spec(self.model_dump(exclude={"type"}), strict=False)
        return self


# ---- model ------------------------------------------------------------------------------------
class CNFModel(_SectionChecked):
    """Continuous normalizing flow (FFJORD, Grathwohl et al. 2019): dz/dt = f(z, t), d log p/dt = -tr(df/dz)."""

    SECTION: ClassVar[type] = CNFSection
    type: Literal["cnf"]
    hidden_dims: list[_items(CNFSection, "hidden_dims")] = spec_field(CNFSection, "hidden_dims")  # type: ignore[valid-type]
    nonlinearity: choices(CNFSection, "nonlinearity") = spec_field(CNFSection, "nonlinearity")  # type: ignore[valid-type]
    num_blocks: int = spec_field(CNFSection, "num_blocks")
    vector_field: choices(CNFSection, "vector_field") = spec_field(CNFSection, "vector_field")  # type: ignore[valid-type]
    planar_width: int = spec_field(CNFSection, "planar_width")
    trace_estimator: choices(CNFSection, "trace_estimator") = spec_field(CNFSection, "trace_estimator")  # type: ignore[valid-type]
    noise: choices(CNFSection, "noise") = spec_field(CNFSection, "noise")  # type: ignore[valid-type]
    end_time: float = spec_field(CNFSection, "end_time")
    train_end_time: bool = spec_field(CNFSection, "train_end_time")
    kinetic_energy: float = spec_field(CNFSection, "kinetic_energy")
    jacobian_norm: float = spec_field(CNFSection, "jacobian_norm")


class PlanarModel(_SectionChecked):
    """Discrete planar flow (Rezende & Mohamed 2015) with ``num_layers`` layers."""

    SECTION: ClassVar[type] = PlanarSection
    type: Literal["planar"]
    num_layers: int = spec_field(PlanarSection, "num_layers")


class ODENetModel(_SectionChecked):
    """ODE-Net (Chen et al. 2018) or its RK-Net variant (backprop through a fixed-step RK solve)."""

    SECTION: ClassVar[type] = ODENetSection
    type: Literal["odenet", "rknet"]
    channels: int = spec_field(ODENetSection, "channels")


class ResNetModel(_SectionChecked):
    """Residual network baseline with ``num_blocks`` residual blocks."""

    SECTION: ClassVar[type] = ResNetSection
    type: Literal["resnet"]
    channels: int = spec_field(ResNetSection, "channels")
    num_blocks: int = spec_field(ResNetSection, "num_blocks")


class MLPModel(_SectionChecked):
    """One-hidden-layer perceptron baseline (Chen et al. 2018, Table 1)."""

    SECTION: ClassVar[type] = MLPSection
    type: Literal["mlp"]
    hidden: int = spec_field(MLPSection, "hidden")


class NODEModel(_SectionChecked):
    """Neural ODE on time series, dy/dt = f(t, y) (MLP field; ``augment_dim``: Dupont et al. 2019)."""

    SECTION: ClassVar[type] = NODESection
    type: Literal["node"]
    hidden_dims: list[_items(NODESection, "hidden_dims")] = spec_field(NODESection, "hidden_dims")  # type: ignore[valid-type]
    nonlinearity: choices(NODESection, "nonlinearity") = spec_field(NODESection, "nonlinearity")  # type: ignore[valid-type]
    augment_dim: int = spec_field(NODESection, "augment_dim")


class LatentODEModel(_SectionChecked):
    """Latent ODE with an ODE-RNN encoder (Rubanova et al. 2019), trained on the ELBO with KL annealing."""

    SECTION: ClassVar[type] = LatentODESection
    type: Literal["latent_ode"]
    latent_dim: int = spec_field(LatentODESection, "latent_dim")
    hidden: int = spec_field(LatentODESection, "hidden")
    rec_hidden: int = spec_field(LatentODESection, "rec_hidden")
    obs_std: float = spec_field(LatentODESection, "obs_std")
    kl_anneal_steps: int = spec_field(LatentODESection, "kl_anneal_steps")
    elbo_samples: int = spec_field(LatentODESection, "elbo_samples")


class RNNModel(_SectionChecked):
    """GRU baseline with the time gap as an input (Chen et al. 2018 §5.1); no ODE."""

    SECTION: ClassVar[type] = RNNSection
    type: Literal["rnn"]
    hidden: int = spec_field(RNNSection, "hidden")


ModelSpec = Annotated[
    Union[CNFModel, PlanarModel, ODENetModel, ResNetModel, MLPModel, NODEModel, LatentODEModel, RNNModel],
    Field(discriminator="type"),
]


# ---- dataset ----------------------------------------------------------------------------------
def dataset_kind(name: str) -> str | None:
    """The model family that trains on data set ``name`` (node_engine's registry); None if unknown."""
    from node_engine.datasets import DATASETS  # the one registry of names (imported lazily: torch)

    entry = DATASETS.get(name)
    return entry.kind if entry is not None else None


def known_datasets() -> list[str]:
    from node_engine.datasets import DATASETS

    return sorted(DATASETS)


class DatasetSpec(Strict):
    """A registry data set (generated with ``n_samples``/``seed``) or ``{"name": "upload", "id": ...}``."""

    name: str = Field(min_length=1, max_length=64)
    n_samples: int = spec_field(DatasetSection, "n_samples")
    test_fraction: float = spec_field(DatasetSection, "test_fraction")
    seed: Seed = spec_field(DatasetSection, "seed")
    n_points: int = spec_field(DatasetSection, "n_points")
    id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$", description="uploaded data set id (name 'upload' only)")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if dataset_kind(v) is None:
            raise ValueError(f"unknown data set {v!r}; known: {', '.join(known_datasets())}")
        return v

    @model_validator(mode="after")
    def _upload_needs_id(self) -> "DatasetSpec":
        from node_engine.datasets import UPLOADS

        if self.name in UPLOADS and self.id is None:
            raise ValueError(f"dataset {self.name!r} needs the 'id' returned by POST /v1/datasets")
        if self.name not in UPLOADS and self.id is not None:
            raise ValueError(f"'id' is only allowed with dataset names {', '.join(UPLOADS)}")
        return self

    @model_validator(mode="after")
    def _files_present(self) -> "DatasetSpec":
        # a data set read from files the workers lack is refused now, not failed after a 202
        from node_engine.datasets import get_entry

        missing = get_entry(self.name).missing(self.model_dump())
        if missing:
            raise ValueError(missing)
        return self


# ---- solver -----------------------------------------------------------------------------------
class SolverSpec(Strict):
    """ODE solver options (torchdiffeq names). Tolerances are per-step local error, mixed rel/abs."""

    method: choices(SolverSection, "method") = spec_field(SolverSection, "method")  # type: ignore[valid-type]
    rtol: float = spec_field(SolverSection, "rtol")
    atol: float = spec_field(SolverSection, "atol")
    adjoint: bool = spec_field(SolverSection, "adjoint")
    adjoint_norm: choices(SolverSection, "adjoint_norm") = spec_field(SolverSection, "adjoint_norm")  # type: ignore[valid-type]
    adjoint_mode: choices(SolverSection, "adjoint_mode") = spec_field(SolverSection, "adjoint_mode")  # type: ignore[valid-type]
    step_size: float | None = spec_field(SolverSection, "step_size")
    max_num_steps: int = spec_field(SolverSection, "max_num_steps")
    compile: choices(SolverSection, "compile") = spec_field(SolverSection, "compile")  # type: ignore[valid-type]
    eval_rtol: float | None = spec_field(SolverSection, "eval_rtol")
    eval_atol: float | None = spec_field(SolverSection, "eval_atol")

    @model_validator(mode="after")
    def _stiff_adjoint(self) -> "SolverSpec":
        from node_engine.specs import stiff_adjoint_error

        reason = stiff_adjoint_error(self.method, self.adjoint, self.adjoint_mode)
        if reason:
            raise ValueError(reason)
        return self


# ---- training ---------------------------------------------------------------------------------
class TrainingSpec(Strict):
    """Optimisation loop (Adam). Exactly one of ``iterations`` / ``epochs``; default 1000 iterations.
    ``batch_size`` null: the model family's default (classifier 128, density/energy 512)."""

    iterations: int | None = spec_field(TrainingSection, "iterations", default=None)
    epochs: int | None = spec_field(TrainingSection, "epochs")
    batch_size: int | None = spec_field(TrainingSection, "batch_size")
    lr: float = spec_field(TrainingSection, "lr")
    weight_decay: float = spec_field(TrainingSection, "weight_decay")
    seed: Seed = spec_field(TrainingSection, "seed")
    eval_every: int = spec_field(TrainingSection, "eval_every")
    checkpoint_every: int = spec_field(TrainingSection, "checkpoint_every")
    log_every: int = spec_field(TrainingSection, "log_every")

    @model_validator(mode="after")
    def _one_length(self) -> "TrainingSpec":
        if self.iterations is not None and self.epochs is not None:
            raise ValueError("give either 'iterations' or 'epochs', not both")
        if self.iterations is None and self.epochs is None:
            self.iterations = TrainingSection.iterations
        return self


Tag = Annotated[str, Field(pattern=RUN_TAG_PATTERN, description="letters, digits and _.:/=+- (up to 64)")]


class InitFrom(Strict):
    """Start from another job's checkpoint (fine-tuning): the model's parameters are loaded from it;
    the optimizer, the step count and the data order start afresh."""

    job: str = Field(pattern=JOB_ID_PATTERN, description="id of a job of the same API key with the same model section")
    checkpoint: str | None = Field(None, pattern=CHECKPOINT_NAME_PATTERN,
                                   description="a checkpoint of that job (GET /v1/jobs/{id}/checkpoints); null: its "
                                               "newest, resolved at submission (the stored spec names it)")


class JobCreate(Strict):
    """Body of ``POST /v1/jobs``: what to train, on what, with which solver; optionally a run ``name``,
    ``tags`` and a checkpoint to start from (``init_from``)."""

    model: ModelSpec
    dataset: DatasetSpec
    solver: SolverSpec = Field(default_factory=SolverSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    name: str | None = Field(None, min_length=1, max_length=RUN_NAME_MAX_CHARS, pattern=r"^[^\x00-\x1f\x7f]*$",
                             description="a label for the run (listed with the job; GET /v1/jobs?name= searches it)")
    tags: list[Tag] = Field(default_factory=list, max_length=RUN_TAGS_MAX,
                            description="labels of the run (GET /v1/jobs?tag= filters by one); duplicates dropped")
    init_from: InitFrom | None = Field(None, description="start from this job's checkpoint (same model section)")

    @field_validator("tags")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _model_fits_data(self) -> "JobCreate":
        from node_engine.families import family_for_dataset_name
        from node_engine.models import MODEL_TYPES

        family = family_for_dataset_name(self.dataset.name)
        if self.model.type not in family.model_types:
            raise ValueError(f"model {self.model.type!r} does not fit {self.dataset.name!r}, a {family.name} data set "
                             f"(model types: {', '.join(family.model_types)})")
        if self.training.batch_size is None:
            self.training.batch_size = family.default_batch_size
        # Caught here, not in the worker: a CNF on a fixed grid has no step size to fall back on
        # (the classifiers default to RK-Net's step 0.1; planar flows use no solver).
        if MODEL_TYPES[self.model.type].per_row_grids and self.solver.method in FIXED:
            raise ValueError(f"solver.method: model {self.model.type!r} integrates each series on its own times and "
                             f"needs an adaptive method ({', '.join(sorted(ADAPTIVE))}), got {self.solver.method!r}")
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
    name: str | None = Field(None, description="the spec's run name")
    tags: list[str] = Field(default_factory=list, description="the spec's tags")
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
    history: list[dict[str, Any]] = Field(description=(
        "one row per logged step: step, loss, nfe_forward, nfe_backward, step_size (mean accepted step of "
        "the step's forward solves, in the time units of the ODE's t; absent without an ODE solve), ..."))
    next_page_token: str | None


class CheckpointInfo(BaseModel):
    name: str
    size_bytes: int
    url: str


class CheckpointsPublic(BaseModel):
    checkpoints: list[CheckpointInfo]


class LogDensityRequest(Strict):
    points: list[list[Finite]] = Field(min_length=1, max_length=100_000, description="(N, D) in data coordinates")


class PointFailure(BaseModel):
    """A point of a log-density request without a finite answer (its value is null)."""

    index: int = Field(description="the point's index in `points`")
    reason: str = Field(description="'underflow: ...' (log p below float64: p is 0 to machine precision), "
                                    "'max_num_steps: ...', 'step_underflow: ...', 'non_finite: ...' "
                                    "(the point's ODE solve failed), or 'non-finite: ...' (NaN/+inf)")


class LogDensityResponse(BaseModel):
    log_density: list[float | None] = Field(description="(N,) log p(x) in nats; null where there is no finite "
                                                        "value (the point is listed in `failed`)")
    failed: list[PointFailure] = Field(default_factory=list,
                                       description="the points whose value is null, and why (empty: all answered)")
    nfe: int = Field(description="vector-field evaluations used")
    checkpoint: str


class SamplesRequest(Strict):
    n: int = Field(1000, ge=1, le=100_000)
    seed: Seed = 0


class SamplesResponse(BaseModel):
    samples: list[list[float]] = Field(description="(n, D) in data coordinates")
    checkpoint: str


class PredictRequest(Strict):
    inputs: list[Any] = Field(min_length=1, description=(
        "N x C x H x W or N x H x W pixel values in the units of the job's training images, as they "
        "are read: `digits` 0 to 16 (scikit-learn's 8x8 digits, 17 grey levels; 0 = background), "
        "`mnist` and `mnist5k` 0 to 255 (8-bit). Images in other units are classified badly without "
        "an error (digits sent as 0..1 scored 15%, as 0..255 22%, as 0..16 98%): rescale first, "
        "e.g. x * 16 for a 0..1 digit."))


class PredictResponse(BaseModel):
    probabilities: list[list[float]] = Field(description="(N, 10) class probabilities")
    checkpoint: str


class SeriesObservations(Strict):
    """One series' observations: times (strictly increasing) and values (T, D), null = missing."""

    t: list[Finite] = Field(min_length=1, max_length=100_000, description="(T,) observation times")
    y: list[list[Finite | None]] = Field(min_length=1, max_length=100_000, description="(T, D) values; null = missing")
    mask: list[list[bool]] | None = Field(None, description="(T, D), true = observed (default: the non-null values)")


class ForecastRequest(Strict):
    series: list[SeriesObservations] = Field(min_length=1, max_length=10_000)
    t: list[Finite] = Field(min_length=1, max_length=100_000,
                            description="strictly increasing times wanted for every series (not before its first observation)")
    samples: int | None = Field(None, ge=1, le=1000, description="posterior draws per series (latent_ode only; "
                                "at most ODEFORGE_MAX_FORECAST_SAMPLES)")
    seed: Seed = Field(0, description="draw j of a series is keyed by (seed, j, the series' own observations)")


class SeriesForecast(BaseModel):
    t: list[float]
    mean: list[list[float]] = Field(description="(T, D) in the data's units (latent_ode: the decoded "
                                    "trajectory of the posterior mean z0)")
    samples: list[list[list[float]]] | None = Field(None, description="(k, T, D) posterior draws in the data's "
                                                    "units, when 'samples' was asked")


class ForecastResponse(BaseModel):
    forecasts: list[SeriesForecast]
    nfe: int = Field(description="vector-field evaluations used")
    checkpoint: str


class DatasetPublic(BaseModel):
    id: str
    shape: list[int] = Field(description="(N, D) for arrays, (N, T, D) for time series")
    # how the values are stored: the upload's own dtype at most float32 unless asked (?dtype=)
    dtype: str | None = Field(None, description="stored dtype (in the upload's answer)")
    kind: Literal["array", "series"] | None = Field(None, description="array (N, D) or series (N, T, D)")
    filename: str | None = None
    created_at: datetime | None = None


class DatasetsPublic(BaseModel):
    datasets: list[DatasetPublic]
    next_page_token: str | None


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, str]] | None = Field(None, description="field-level reasons: {field, reason}")


def job_public(job: Any) -> JobPublic:
    """The public view of a ``jobs.tables.Job`` row (internals such as the fencing token stay hidden)."""
    spec = job.spec or {}
    return JobPublic(
        id=job.id,
        name=spec.get("name"),
        tags=list(spec.get("tags") or ()),
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


def dataset_public(ds: Any, dtype: str | None = None) -> DatasetPublic:
    """The public view of a ``jobs.tables.Dataset`` row (``dtype``: the stored dtype, known at upload)."""
    shape = list(ds.shape or ())
    return DatasetPublic(id=ds.id, shape=shape, kind="series" if len(shape) == 3 else "array",
                         filename=ds.filename or None, created_at=ds.created_at, dtype=dtype)
