"""``/v1/jobs``: submit, read, list and cancel training jobs."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response

from service import pagination
from service.auth import owns, request_owner, scoped_idempotency_key
from service.broker import BrokerUnavailable
from service.deps import BrokerDep, JobDep, MetricsDep, SettingsDep, StoreDep
from service.errors import ProblemError
from service.schemas import JobCreate, JobPublic, JobsPublic, Problem, job_public
from service.store import IdempotencyConflict

router = APIRouter(prefix="/jobs", tags=["jobs"])

PROBLEMS = {
    404: {"model": Problem, "content": {"application/problem+json": {}}},
    422: {"model": Problem, "content": {"application/problem+json": {}}},
}


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses={**PROBLEMS, 503: {"model": Problem, "description": "message broker unreachable"}},
)
def submit_job(
    body: JobCreate,
    request: Request,
    response: Response,
    store: StoreDep,
    broker: BrokerDep,
    metrics: MetricsDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)] = None,
) -> JobPublic:
    """Queue a training job; 202 with ``Location: /v1/jobs/{id}``.

    A repeated request with the same ``Idempotency-Key`` and body returns the job created first
    (the key with another body is a 422). When the broker is down the job is not kept: 503.
    """
    owner = request_owner(request)
    if body.dataset.name == "upload" and not _visible_dataset(store, request, body.dataset.id):
        raise ProblemError(422, "invalid-request", f"no uploaded data set with id {body.dataset.id!r}",
                           errors=[{"field": "dataset.id", "reason": "unknown uploaded data set"}])
    spec = body.model_dump(mode="json")
    try:
        job, created = store.create_job(spec, idempotency_key=scoped_idempotency_key(owner, idempotency_key),
                                        owner=owner)
    except IdempotencyConflict as exc:
        raise ProblemError(422, "idempotency-key-reused",
                           f"Idempotency-Key was used for job {exc} with a different body",
                           errors=[{"field": "Idempotency-Key", "reason": "reused with a different request body"}])
    if created:
        try:
            broker.enqueue_training(job.id)
        except BrokerUnavailable as exc:
            store.delete_job(job.id)  # a rejected submission leaves nothing behind
            metrics.broker_errors.inc()
            raise ProblemError(503, "broker-unavailable", f"the job queue is unavailable, retry later ({exc})",
                               headers={"Retry-After": "5"})
        metrics.jobs_submitted.inc()
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_public(job)


def _visible_dataset(store, request: Request, dataset_id: str) -> bool:
    ds = store.get_dataset(dataset_id)
    return ds is not None and owns(request, ds.owner)


@router.get("", response_model=JobsPublic, responses=PROBLEMS)
def list_jobs(
    store: StoreDep,
    request: Request,
    settings: SettingsDep,
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
    limit: Annotated[int | None, Query(ge=1, le=1000)] = None,
    page_token: Annotated[str | None, Query(max_length=128)] = None,
) -> JobsPublic:
    """Jobs, newest first, optionally only those with ``status``; follow ``next_page_token``."""
    limit = min(limit or settings.page_limit_default, settings.page_limit_max)
    jobs, next_seq = store.list_jobs(status=status, limit=limit, before_seq=pagination.decode("jobs", page_token),
                                     owner=request_owner(request))
    token = pagination.encode("jobs", next_seq) if next_seq is not None else None
    return JobsPublic(jobs=[job_public(j) for j in jobs], next_page_token=token)


@router.get("/{job_id}", response_model=JobPublic, responses=PROBLEMS)
def get_job(job: JobDep) -> JobPublic:
    """Status, progress (0..1), spec, latest metrics and error of a job."""
    return job_public(job)


@router.post("/{job_id}/cancel", response_model=JobPublic,
             responses={**PROBLEMS, 409: {"model": Problem, "description": "the job already finished"}})
def cancel_job(job: JobDep, store: StoreDep, response: Response) -> JobPublic:
    """Cancel a job. A queued job is ``cancelled`` at once (200); a running one stops between training
    steps (202, status stays ``running`` until the worker has stopped). 409 if it already finished."""
    result = store.request_cancel(job.id)
    if result.job is None:
        raise ProblemError(404, "job-not-found", f"no job with id {job.id!r}")
    if result.conflict:
        raise ProblemError(409, "job-finished", f"job {job.id} already {result.job.status}; nothing to cancel")
    response.status_code = 202 if result.job.status == "running" else 200
    return job_public(result.job)
