"""Queries of trained models: ``log-density`` and ``samples`` (density, energy), ``predict`` (classifier),
``forecast`` (time series);
which operations a job's model serves is its family's word (``node_engine.families``).

Each route is a thin async wrapper: it takes an admission slot and a budget from the inference pool
(``service.inference_pool``: 503 ``inference-busy`` when full), runs the operation's sync body
(model load, validation, solve) on the pool's threads, and awaits it on the event loop while
watching the deadline and the client's connection. Log-density requests go through the
micro-batcher (``service.batching``), whose drains run on the same threads. Budget refusals:
``inference-budget-exceeded`` (422, ``ODEFORGE_INFERENCE_MAX_NFE``), ``inference-timeout`` (503,
``ODEFORGE_INFERENCE_TIMEOUT_S``).

Non-finite answers: JSON has no inf/NaN. A log-density that is not a finite float is ``null`` in
``log_density`` and its point is listed in ``failed`` with a reason (underflow to −inf far from the
data, a failed solve, NaN); the other points are answered as usual. Inputs that cannot be evaluated
(coordinates that overflow the model's dtype, numbers beyond float64) are a 422 naming the field
and index. Samples, probabilities and forecasts must be finite, else a 422 ``evaluation-failed``.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Annotated, Any, Callable, Iterator, TypeVar

import numpy as np
from fastapi import APIRouter, Request

from jobs.tables import Job
from service.deps import BatcherDep, InferenceDep, JobDep, MetricsDep, ModelsDep, SettingsDep
from service.errors import ProblemError
from service.inference import LoadedModel, ModelCache, NoCheckpoint
from service.inference_pool import Budget, InferencePool, timeout_problem
from service.limits import json_body, json_body_openapi
from service.routers.jobs import PROBLEMS
from service.schemas import (
    ForecastRequest,
    ForecastResponse,
    LogDensityRequest,
    LogDensityResponse,
    PointFailure,
    PredictRequest,
    PredictResponse,
    Problem,
    SamplesRequest,
    SamplesResponse,
    SeriesForecast,
)

MAX_PIXEL = 1e4

router = APIRouter(prefix="/jobs", tags=["inference"])

T = TypeVar("T")

# Request bodies parsed by service.limits.json_body (off the event loop when large), not by FastAPI.
LogDensityBody = Annotated[LogDensityRequest, json_body(LogDensityRequest)]
SamplesBody = Annotated[SamplesRequest, json_body(SamplesRequest)]
PredictBody = Annotated[PredictRequest, json_body(PredictRequest)]
ForecastBody = Annotated[ForecastRequest, json_body(ForecastRequest)]

RESPONSES = {**PROBLEMS, 409: {"model": Problem, "description": "wrong model type or no checkpoint yet"},
             503: {"model": Problem, "description": "inference capacity reached (`inference-busy`) or the "
                                                    "request's time budget ran out (`inference-timeout`); "
                                                    "retry after Retry-After seconds"}}


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


def _budget_exceeded(field: str, max_nfe: int | None, detail: str) -> ProblemError:
    return ProblemError(422, "inference-budget-exceeded", f"{detail} (ODEFORGE_INFERENCE_MAX_NFE={max_nfe})",
                        errors=[{"field": field, "reason": f"needs more than {max_nfe} field evaluations per solve"}])


@contextmanager
def _solver_errors(field: str) -> Iterator[None]:
    """Solver failures as problems: an NFE budget overrun is a 422 ``inference-budget-exceeded``, any
    other named node_engine error a 422 ``evaluation-failed``; ``SolveCancelled`` (deadline,
    disconnect) passes through to the route, which answers ``inference-timeout``."""
    from node_engine.errors import NFEBudgetExceeded, ODEForgeError, SolveCancelled
    from node_engine.solve_limits import current_limits

    try:
        yield
    except SolveCancelled:
        raise
    except NFEBudgetExceeded as exc:
        raise _budget_exceeded(field, current_limits().get("max_nfe"), str(exc)) from None
    except ODEForgeError as exc:
        raise ProblemError(422, "evaluation-failed", f"{type(exc).__name__}: {exc}",
                           errors=[{"field": field, "reason": f"{type(exc).__name__}: {exc}"}]) from None


async def _budgeted(request: Request, pool: InferencePool, work: Callable[[Budget], Any]) -> Any:
    """Admit the request (503 ``inference-busy``), run ``await work(budget)``, map a stopped solve to
    503 ``inference-timeout``; the admission slot is freed once the route and its work are done."""
    from node_engine.errors import SolveCancelled

    budget = pool.admit()
    try:
        return await work(budget)
    except SolveCancelled:
        budget.expired()  # record the deadline as the reason when that is what stopped it
        raise timeout_problem(budget) from None
    finally:
        budget.close()


def _log_density_input(job: Job, body: LogDensityRequest, models: ModelCache, max_points: int
                       ) -> tuple[LoadedModel, np.ndarray]:
    """The model and the (N, D) float64 points of a log-density request (pool thread: loads a checkpoint).
    422 naming the field: too many points, a wrong dimension, a coordinate overflowing the model's dtype."""
    if len(body.points) > max_points:
        raise ProblemError(422, "invalid-request", f"{len(body.points)} points; at most {max_points}",
                           errors=[{"field": "points", "reason": f"at most {max_points} points per request"}])
    entry = load_job_model(job, models, "log_density", "log-density")
    dim = int(entry.model.dim)
    for i, p in enumerate(body.points):
        if len(p) != dim:
            raise ProblemError(422, "invalid-request", f"points[{i}] has {len(p)} coordinates; the model is {dim}-D",
                               errors=[{"field": f"points[{i}]", "reason": f"expected {dim} coordinates, got {len(p)}"}])
    x = np.asarray(body.points, dtype=np.float64)
    bad = entry.model.out_of_range(x)
    if len(bad):
        i, j = (int(v) for v in bad[0])
        limit = float(entry.model.max_abs_input()[j])
        raise _invalid(f"points[{i}][{j}]", f"|{x[i, j]:g}| overflows the model's floating type once standardized; "
                                            f"at most {limit:g}")
    return entry, x


def _log_density_answer(log_p: np.ndarray, status: np.ndarray, max_nfe: int | None
                        ) -> tuple[list[float | None], list[PointFailure]]:
    """``log_density`` with null where there is no finite value, and the ``failed`` list naming why.
    A point stopped by the NFE budget fails the request (422 ``inference-budget-exceeded``)."""
    from node_engine.errors import SolveStatus
    from node_engine.inference import row_reasons

    over = np.flatnonzero(np.asarray(status) == SolveStatus.NFE_BUDGET)
    if over.size:
        raise _budget_exceeded(f"points[{int(over[0])}]", max_nfe,
                               f"point {int(over[0])} (and {over.size - 1} more) needs more field evaluations "
                               f"than this deployment allows per solve")
    reasons = row_reasons(log_p, status)
    values = [float(v) if r is None else None for v, r in zip(np.asarray(log_p, dtype=np.float64).tolist(), reasons)]
    failed = [PointFailure(index=i, reason=r) for i, r in enumerate(reasons) if r is not None]
    return values, failed


@router.post("/{job_id}/log-density", response_model=LogDensityResponse, responses=RESPONSES,
             openapi_extra=json_body_openapi(LogDensityRequest))
async def log_density(request: Request, job: JobDep, body: LogDensityBody, models: ModelsDep,
                      settings: SettingsDep, metrics: MetricsDep, pool: InferenceDep,
                      batcher: BatcherDep) -> LogDensityResponse:
    """log p(x) in nats at ``points`` (N, D), in the data set's original coordinates.

    Uses the job's newest checkpoint (also while it still trains). A point without a finite
    log-density is ``null`` in ``log_density`` and listed in ``failed`` (``{"index", "reason"}``):
    ``underflow`` (−inf: p(x) is 0 to float64 precision, far outside the data), a failed solve
    (``max_num_steps``, ``step_underflow``, ``non_finite``), or a NaN; the other points are answered.
    409: not a density job or no checkpoint; 422: wrong dimension, non-finite values, a coordinate
    that overflows the model's dtype once standardized (``points[i][j]``), more than
    ``ODEFORGE_MAX_POINTS`` points, a point needing more than ``ODEFORGE_INFERENCE_MAX_NFE`` field
    evaluations in a solve (``inference-budget-exceeded``); 503: ``inference-busy`` or
    ``inference-timeout`` (``ODEFORGE_INFERENCE_TIMEOUT_S``).
    """
    async def work(budget: Budget) -> LogDensityResponse:
        entry, x = await pool.call(request, budget,
                                   lambda: _log_density_input(job, body, models, settings.max_points))
        start = time.perf_counter()
        with _solver_errors("points"):  # concurrent requests on one model share a solve (service.batching)
            log_p, status, nfe = await pool.wait(request, budget, batcher.submit(entry, x, budget))
        metrics.inference_seconds.labels("log_density").observe(time.perf_counter() - start)
        metrics.inference_points.labels("log_density").inc(len(x))
        values, failed = _log_density_answer(log_p, status, budget.max_nfe)
        return LogDensityResponse(log_density=values, failed=failed, nfe=int(nfe), checkpoint=entry.checkpoint)

    return await _budgeted(request, pool, work)


async def _pooled(request: Request, pool: InferencePool, operation: Callable[[], T]) -> T:
    """A sync operation body (model load, validation, solve): admitted, run on the inference pool under its budget."""
    return await _budgeted(request, pool, lambda budget: pool.call(request, budget, operation))


@router.post("/{job_id}/samples", response_model=SamplesResponse, responses=RESPONSES,
             openapi_extra=json_body_openapi(SamplesRequest))
async def samples(request: Request, job: JobDep, body: SamplesBody, models: ModelsDep, settings: SettingsDep,
                  metrics: MetricsDep, pool: InferenceDep) -> SamplesResponse:
    """``n`` samples x ~ p (n, D) in original coordinates, reproducible for a given ``seed``.

    422: more than ``ODEFORGE_MAX_SAMPLES``, a failed or non-finite sample, the NFE budget
    (``inference-budget-exceeded``); 503: ``inference-busy``, ``inference-timeout``."""
    return await _pooled(request, pool, lambda: samples_sync(job, body, models, settings, metrics))


def samples_sync(job: Job, body: SamplesRequest, models: ModelCache, settings: Any, metrics: Any) -> SamplesResponse:
    """The body of :func:`samples` (inference pool thread)."""
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


@router.post("/{job_id}/predict", response_model=PredictResponse, responses=RESPONSES,
             openapi_extra=json_body_openapi(PredictRequest))
async def predict(request: Request, job: JobDep, body: PredictBody, models: ModelsDep, settings: SettingsDep,
                  metrics: MetricsDep, pool: InferenceDep) -> PredictResponse:
    """Class probabilities (N, 10) for images ``inputs`` (N, C, H, W) or (N, H, W), raw pixel scale.

    422 naming the field: wrong shape, a value that is not a number or beyond float64 (e.g. a
    400-digit integer: ``inputs[i][j]...``), NaN, pixels beyond ±1e4, the NFE budget; 503: busy, timeout."""
    return await _pooled(request, pool, lambda: predict_sync(job, body, models, settings, metrics))


def predict_sync(job: Job, body: PredictRequest, models: ModelCache, settings: Any, metrics: Any) -> PredictResponse:
    """The body of :func:`predict` (inference pool thread)."""
    if len(body.inputs) > settings.max_predict_inputs:
        raise ProblemError(422, "invalid-request", f"{len(body.inputs)} inputs; at most {settings.max_predict_inputs}",
                           errors=[{"field": "inputs", "reason": f"at most {settings.max_predict_inputs} inputs"}])
    entry = load_job_model(job, models, "predict", "predict")
    shape = tuple(int(s) for s in entry.model.input_shape)
    try:
        x = np.asarray(body.inputs, dtype=np.float64)
    except OverflowError:  # an integer beyond float64 (e.g. 400 digits): name where it is
        _first_unrepresentable(body.inputs, "inputs")
        x = None
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


def _first_unrepresentable(values: Any, field: str) -> None:
    """422 naming the first number in nested lists ``values`` that float64 cannot hold (an integer of
    hundreds of digits, a float beyond ±1.8e308); other non-numbers are left to the shape check."""
    stack: list[tuple[str, Any]] = [(field, values)]
    while stack:
        name, value = stack.pop()
        if isinstance(value, list):
            stack.extend((f"{name}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                finite = math.isfinite(float(value))
            except OverflowError:
                finite = False
            if not finite:
                raise _invalid(name, "not a finite float64 number (beyond ±1.8e308, NaN or inf)")


def _invalid(field: str, reason: str) -> ProblemError:
    return ProblemError(422, "invalid-request", f"{field}: {reason}", errors=[{"field": field, "reason": reason}])


def _increasing(values: list[float], field: str) -> None:
    steps = np.flatnonzero(np.diff(np.asarray(values, dtype=np.float64)) <= 0)
    if steps.size:
        raise _invalid(f"{field}[{int(steps[0]) + 1}]", "times must be strictly increasing")


@router.post("/{job_id}/forecast", response_model=ForecastResponse, responses=RESPONSES,
             openapi_extra=json_body_openapi(ForecastRequest))
async def forecast(request: Request, job: JobDep, body: ForecastBody, models: ModelsDep, settings: SettingsDep,
                   metrics: MetricsDep, pool: InferenceDep) -> ForecastResponse:
    """See :func:`forecast_sync`; run on the inference pool (503: ``inference-busy``, ``inference-timeout``;
    422 ``inference-budget-exceeded``: a series needs more than ``ODEFORGE_INFERENCE_MAX_NFE`` evaluations)."""
    return await _pooled(request, pool, lambda: forecast_sync(job, body, models, settings, metrics))


def forecast_sync(job: Job, body: ForecastRequest, models: ModelCache, settings: Any,
                  metrics: Any) -> ForecastResponse:
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
