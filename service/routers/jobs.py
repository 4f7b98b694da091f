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
    responses={**PROBLEMS, 503: {"model": Problem, "description": "message broker unreachable"}},
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
    Refused with 422 before anything is stored: a ``solver.rtol`` / ``solver.eval_rtol`` below what
    float32 training / float64 answers can honour (naming the field), and a spec whose estimated
    cost is above ``ODEFORGE_MAX_JOB_COST`` (``job-too-costly``, naming the estimate and the limit).
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
