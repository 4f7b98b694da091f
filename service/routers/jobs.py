"""``/v1/jobs``: submit, read, list and cancel training jobs (thin: the work is in ``service.job_service``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from jobs.status import JobStatus
from service.deps import CallerDep, JobDep, JobServiceDep, SettingsDep
from service.schemas import JobCreate, JobPublic, JobsPublic, Problem, job_public

router = APIRouter(prefix="/jobs", tags=["jobs"])

PROBLEMS = {
    404: {"model": Problem, "content": {"application/problem+json": {}}},
    422: {"model": Problem, "content": {"application/problem+json": {}}},
}


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses={**PROBLEMS, 503: {"model": Problem, "description": "message broker unreachable"},
               507: {"model": Problem, "description": "artifact or database disk full, or owner quota exceeded"}},
)
def submit_job(
    body: JobCreate,
    response: Response,
    jobs: JobServiceDep,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)] = None,
) -> JobPublic:
    """Queue a training job; 202 with ``Location: /v1/jobs/{id}``.

    A repeated request with the same ``Idempotency-Key`` and body returns the job created first
    (the key with another body is a 422). When the broker is down the job is not kept: 503.
    507 ``insufficient-storage`` (a disk full or below ``ODEFORGE_MIN_FREE_BYTES``) or
    ``quota-exceeded`` (the caller's uploads and checkpoints at ``ODEFORGE_OWNER_QUOTA_BYTES``).
    """
    job, created = jobs.submit(body.model_dump(mode="json"), caller, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_public(job)


@router.get("", response_model=JobsPublic, responses=PROBLEMS)
def list_jobs(
    jobs: JobServiceDep,
    caller: CallerDep,
    settings: SettingsDep,
    status: JobStatus | None = None,
    limit: Annotated[int | None, Query(ge=1, le=1000)] = None,
    page_token: Annotated[str | None, Query(max_length=128)] = None,
) -> JobsPublic:
    """Jobs, newest first, optionally only those with ``status``; follow ``next_page_token``."""
    limit = min(limit or settings.page_limit_default, settings.page_limit_max)
    page, token = jobs.list(caller, status=status, limit=limit, page_token=page_token)
    return JobsPublic(jobs=[job_public(j) for j in page], next_page_token=token)


@router.get("/{job_id}", response_model=JobPublic, responses=PROBLEMS)
def get_job(job: JobDep) -> JobPublic:
    """Status, progress (0..1), spec, latest metrics and error of a job."""
    return job_public(job)


@router.post("/{job_id}/cancel", response_model=JobPublic,
             responses={**PROBLEMS, 409: {"model": Problem, "description": "the job already finished"}})
def cancel_job(job: JobDep, jobs: JobServiceDep, response: Response) -> JobPublic:
    """Cancel a job. A queued job is ``cancelled`` at once (200); a running one stops between training
    steps (202, status stays ``running`` until the worker has stopped). 409 if it already finished."""
    job = jobs.cancel(job)
    response.status_code = 202 if job.status == JobStatus.RUNNING else 200
    return job_public(job)
