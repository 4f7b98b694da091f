"""Queries of trained models: ``log-density`` and ``samples`` (density, energy), ``predict`` (classifier),
``forecast`` (time series);
which operations a job's model serves is its family's word (``node_engine.families``).

These are sync routes, so FastAPI runs them in its threadpool: the event loop keeps serving other
requests (``/healthz``) while a model integrates an ODE.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from fastapi import APIRouter

from service.batching import LogDensityBatcher
from jobs.tables import Job
from service.deps import JobDep, MetricsDep, ModelsDep, SettingsDep
from service.errors import ProblemError
from service.inference import LoadedModel, ModelCache, NoCheckpoint
from service.routers.jobs import PROBLEMS
from service.schemas import (
    ForecastRequest,
    ForecastResponse,
    LogDensityRequest,
    LogDensityResponse,
    PredictRequest,
    PredictResponse,
    Problem,
    SamplesRequest,
    SamplesResponse,
    SeriesForecast,
)

MAX_PIXEL = 1e4

router = APIRouter(prefix="/jobs", tags=["inference"])

_batcher = LogDensityBatcher()

RESPONSES = {**PROBLEMS, 409: {"model": Problem, "description": "wrong model type or no checkpoint yet"}}


def load_job_model(job: Job, models: ModelCache, operation: str, what: str) -> LoadedModel:
    """The cached model of the job's newest checkpoint; 409 problem when the job's model family does
    not serve ``operation`` (``node_engine.families``: "log_density", "samples", "predict", or a plot
    name for ``plots``), no checkpoint yet, or a checkpoint node_engine refuses (``CheckpointError``)."""
    from node_engine.errors import CheckpointError
    from node_engine.families import FAMILIES, family_for_spec

    family = family_for_spec(job.spec)
    if operation not in family.serves and operation not in family.plots:
        offering = [f.name for f in FAMILIES.values() if operation in f.serves or operation in f.plots]
        raise ProblemError(409, "wrong-model-type", f"{what} needs a {' or '.join(offering)} job; job {job.id} trains "
                           f"a {family.name} model ({job.model_type!r})")
    try:
        return models.get(job.id)
    except NoCheckpoint:
        raise ProblemError(409, "no-checkpoint", f"job {job.id} ({job.status}) has no checkpoint yet") from None
    except CheckpointError as exc:
        raise ProblemError(409, "checkpoint-invalid", f"job {job.id}'s checkpoint cannot be loaded: {exc}") from None


@contextmanager
def _solver_errors(field: str) -> Iterator[None]:
    from node_engine.errors import ODEForgeError

    try:
        yield
    except ODEForgeError as exc:
        raise ProblemError(422, "evaluation-failed", f"{type(exc).__name__}: {exc}",
                           errors=[{"field": field, "reason": f"{type(exc).__name__}: {exc}"}]) from None


def _finite_or_none(values: np.ndarray) -> list[float | None]:
    # JSON has no inf/NaN; -inf log-density (zero probability) is reported as null.
    return [float(v) if math.isfinite(v) else None for v in values.tolist()]


@router.post("/{job_id}/log-density", response_model=LogDensityResponse, responses=RESPONSES)
def log_density(job: JobDep, body: LogDensityRequest, models: ModelsDep, settings: SettingsDep,
                metrics: MetricsDep) -> LogDensityResponse:
    """log p(x) in nats at ``points`` (N, D), in the data set's original coordinates.

    Uses the job's newest checkpoint (also while it still trains). 409: not a density job or no
    checkpoint; 422: wrong dimension, non-finite values, more than ``ODEFORGE_MAX_POINTS`` points.
    """
    if len(body.points) > settings.max_points:
        raise ProblemError(422, "invalid-request", f"{len(body.points)} points; at most {settings.max_points}",
                           errors=[{"field": "points", "reason": f"at most {settings.max_points} points per request"}])
    entry = load_job_model(job, models, "log_density", "log-density")
    dim = int(entry.model.dim)
    for i, p in enumerate(body.points):
        if len(p) != dim:
            raise ProblemError(422, "invalid-request", f"points[{i}] has {len(p)} coordinates; the model is {dim}-D",
                               errors=[{"field": f"points[{i}]", "reason": f"expected {dim} coordinates, got {len(p)}"}])
    x = np.asarray(body.points, dtype=np.float64)
    start = time.perf_counter()
    with _solver_errors("points"):  # concurrent requests on one model share a solve (service.batching)
        logp, nfe = _batcher.log_density(entry, x)
    metrics.inference_seconds.labels("log_density").observe(time.perf_counter() - start)
    metrics.inference_points.labels("log_density").inc(len(x))
    return LogDensityResponse(log_density=_finite_or_none(np.asarray(logp)), nfe=int(nfe), checkpoint=entry.checkpoint)


@router.post("/{job_id}/samples", response_model=SamplesResponse, responses=RESPONSES)
def samples(job: JobDep, body: SamplesRequest, models: ModelsDep, settings: SettingsDep,
            metrics: MetricsDep) -> SamplesResponse:
    """``n`` samples x ~ p (n, D) in original coordinates, reproducible for a given ``seed``."""
    if body.n > settings.max_samples:
        raise ProblemError(422, "invalid-request", f"n={body.n}; at most {settings.max_samples}",
                           errors=[{"field": "n", "reason": f"at most {settings.max_samples} samples per request"}])
    entry = load_job_model(job, models, "samples", "samples")
    start = time.perf_counter()
    with _solver_errors("n"), entry.lock:
        x = np.asarray(entry.model.sample(body.n, body.seed), dtype=np.float64)
    metrics.inference_seconds.labels("samples").observe(time.perf_counter() - start)
    metrics.inference_points.labels("samples").inc(body.n)
    if not np.isfinite(x).all():
        raise ProblemError(422, "evaluation-failed", "the model produced non-finite samples",
                           errors=[{"field": "seed", "reason": "non-finite samples"}])
    return SamplesResponse(samples=x.tolist(), checkpoint=entry.checkpoint)


@router.post("/{job_id}/predict", response_model=PredictResponse, responses=RESPONSES)
def predict(job: JobDep, body: PredictRequest, models: ModelsDep, settings: SettingsDep,
            metrics: MetricsDep) -> PredictResponse:
    """Class probabilities (N, 10) for images ``inputs`` (N, C, H, W) or (N, H, W), raw pixel scale."""
    if len(body.inputs) > settings.max_predict_inputs:
        raise ProblemError(422, "invalid-request", f"{len(body.inputs)} inputs; at most {settings.max_predict_inputs}",
                           errors=[{"field": "inputs", "reason": f"at most {settings.max_predict_inputs} inputs"}])
    entry = load_job_model(job, models, "predict", "predict")
    shape = tuple(int(s) for s in entry.model.input_shape)
    try:
        x = np.asarray(body.inputs, dtype=np.float64)
    except (ValueError, TypeError):
        x = None
    if x is None or x.shape[1:] not in (shape, shape[1:] if shape[0] == 1 else shape):
        got = "ragged or non-numeric" if x is None else f"shape {x.shape}"
        raise ProblemError(422, "invalid-request", f"inputs: expected N x {' x '.join(map(str, shape))}, got {got}",
                           errors=[{"field": "inputs", "reason": f"expected N x {shape} (or N x H x W), got {got}"}])
    if not np.isfinite(x).all():
        raise ProblemError(422, "invalid-request", "inputs contain NaN or inf",
                           errors=[{"field": "inputs", "reason": "non-finite values"}])
    if np.abs(x).max() > MAX_PIXEL:  # pixels are 0..16 (digits) or 0..255 (MNIST); far beyond overflows float32
        raise ProblemError(422, "invalid-request", f"inputs: pixel values beyond ±{MAX_PIXEL:g}",
                           errors=[{"field": "inputs", "reason": f"|value| must be at most {MAX_PIXEL:g}"}])
    start = time.perf_counter()
    with _solver_errors("inputs"), entry.lock:
        probs = np.asarray(entry.model.predict(x))
    if not np.isfinite(probs).all():
        raise ProblemError(422, "evaluation-failed", "the classifier produced non-finite probabilities for these inputs",
                           errors=[{"field": "inputs", "reason": "model output not finite"}])
    metrics.inference_seconds.labels("predict").observe(time.perf_counter() - start)
    metrics.inference_points.labels("predict").inc(len(x))
    return PredictResponse(probabilities=probs.tolist(), checkpoint=entry.checkpoint)


def _invalid(field: str, reason: str) -> ProblemError:
    return ProblemError(422, "invalid-request", f"{field}: {reason}", errors=[{"field": field, "reason": reason}])


def _increasing(values: list[float], field: str) -> None:
    steps = np.flatnonzero(np.diff(np.asarray(values, dtype=np.float64)) <= 0)
    if steps.size:
        raise _invalid(f"{field}[{int(steps[0]) + 1}]", "times must be strictly increasing")


@router.post("/{job_id}/forecast", response_model=ForecastResponse, responses=RESPONSES)
def forecast(job: JobDep, body: ForecastRequest, models: ModelsDep, settings: SettingsDep,
             metrics: MetricsDep) -> ForecastResponse:
    """Each series' trajectory at times ``t`` in the data's units, from its observations: a ``node``
    model integrates from the series' first observation (which must be fully observed), ``latent_ode``
    encodes all of them (``mean``: the decoded trajectory of the posterior mean z0; ``samples: k``
    adds k posterior draws per series, reproducible for a ``seed``), ``rnn`` reads all of them and
    predicts autoregressively past the last. A series' answer does not depend on the other series of
    the request. 409: not a time-series job or no checkpoint; 422: times out of order or before a
    series' start, wrong dimension, NaN, ``samples`` for a deterministic model (node, rnn) or above
    ``ODEFORGE_MAX_FORECAST_SAMPLES``, more than ``ODEFORGE_MAX_POINTS`` points (observations plus
    answers, draws included)."""
    draws = body.samples or 0
    points = sum(len(s.t) for s in body.series) + len(body.series) * len(body.t) * (1 + draws)
    if points > settings.max_points:
        raise _invalid("series", f"{points} points (observations + forecasts and draws); at most {settings.max_points}")
    if draws > settings.max_forecast_samples:
        raise _invalid("samples", f"at most {settings.max_forecast_samples} posterior draws per series")
    _increasing(body.t, "t")
    entry = load_job_model(job, models, "forecast", "forecast")
    model = entry.model
    if body.samples is not None and not model.samples:
        raise _invalid("samples", f"a {job.model_type!r} model is deterministic and has no posterior draws; "
                                  f"omit 'samples' (only latent_ode samples)")
    dim = int(model.dim)
    series = []
    for i, s in enumerate(body.series):
        name = f"series[{i}]"
        if len(s.y) != len(s.t):
            raise _invalid(f"{name}.y", f"{len(s.y)} rows for {len(s.t)} times")
        for j, row in enumerate(s.y):
            if len(row) != dim:
                raise _invalid(f"{name}.y[{j}]", f"expected {dim} values, got {len(row)}")
        if s.mask is not None and [len(m) for m in s.mask] != [dim] * len(s.t):
            raise _invalid(f"{name}.mask", f"expected {len(s.t)} x {dim} booleans like y")
        _increasing(s.t, f"{name}.t")
        y = np.array([[np.nan if v is None else v for v in row] for row in s.y], dtype=np.float64)
        mask = ~np.isnan(y) if s.mask is None else np.asarray(s.mask, dtype=bool) & ~np.isnan(y)
        if model.needs_observed_start and not mask[0].all():
            raise _invalid(f"{name}.y[0]", "the first observation must be fully observed (the model starts there)")
        if not mask.any():
            raise _invalid(f"{name}.y", "no observed value")
        if body.t[0] < s.t[0]:
            raise _invalid("t", f"t={body.t[0]:g} is before series {i}'s first observation t={s.t[0]:g}")
        series.append((np.asarray(s.t, dtype=np.float64), y, mask))
    start = time.perf_counter()
    with _solver_errors("series"), entry.lock:
        means, drawn, nfe = model.forecast_series(series, np.asarray(body.t, dtype=np.float64), samples=draws,
                                                  seed=body.seed)
    answers = means + (drawn or [])
    if not all(np.isfinite(m).all() for m in answers):
        raise ProblemError(422, "evaluation-failed", "the model produced non-finite trajectories",
                           errors=[{"field": "t", "reason": "non-finite forecast"}])
    metrics.inference_seconds.labels("forecast").observe(time.perf_counter() - start)
    metrics.inference_points.labels("forecast").inc(len(body.series) * len(body.t) * (1 + draws))
    forecasts = [SeriesForecast(t=list(body.t), mean=m.tolist(), samples=None if drawn is None else drawn[i].tolist())
                 for i, m in enumerate(means)]
    return ForecastResponse(forecasts=forecasts, nfe=int(nfe), checkpoint=entry.checkpoint)
