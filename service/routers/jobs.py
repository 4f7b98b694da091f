"""``/v1/jobs``: submit, read, list, cancel and delete training jobs, and stream a job's events
(thin: the work is in ``service.job_service`` and ``service.event_stream``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse

from jobs.status import JobStatus
from service.deps import CallerDep, JobDep, JobServiceDep, SettingsDep, StoreDep
from service.errors import ProblemError
from service.event_stream import job_events
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
    Refused with 422 before anything is stored: a ``solver.rtol`` / ``solver.eval_rtol`` below what
    float32 training / float64 answers can honour (naming the field), and a spec whose estimated
    cost is above ``ODEFORGE_MAX_JOB_COST`` (``job-too-costly``, naming the estimate and the limit).
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
    tag: Annotated[str | None, Query(max_length=64, description="only jobs with this tag (exact)")] = None,
    name: Annotated[str | None, Query(min_length=1, max_length=200,
                                      description="only jobs whose name contains this text (case-insensitive)")] = None,
) -> JobsPublic:
    """Jobs, newest first; optionally only those with ``status``, carrying ``tag`` (exact match), or
    whose ``name`` contains ``name`` (case-insensitive substring; ``%`` and ``_`` are literal).
    Follow ``next_page_token`` (with the same filters)."""
    limit = min(limit or settings.page_limit_default, settings.page_limit_max)
    page, token = jobs.list(caller, status=status, limit=limit, page_token=page_token, tag=tag, name=name)
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


@router.delete("/{job_id}", status_code=204, response_class=Response,
               responses={**PROBLEMS, 409: {"model": Problem, "description": "a queued or running job starts from "
                                                                            "this job's checkpoint (init_from)"}})
def delete_job(job: JobDep, jobs: JobServiceDep) -> Response:
    """Delete a job: a queued or running one is cancelled first (its worker stops at its next write);
    the job row, its metric rows, events and tags, its checkpoints and cached plots are removed (not
    marked: a later GET is a 404). 204 with no body; 409 while another queued or running job starts
    from one of its checkpoints (``init_from``)."""
    jobs.delete(job)
    return Response(status_code=204)


EVENTS_DOC = {
    200: {
        "description": "text/event-stream: `retry:` first, then per event `id:`, `event:` (status, metric, "
                       "evaluation, checkpoint, result) and `data:` (JSON); `: heartbeat` comments while idle",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **PROBLEMS,
}


@router.get("/{job_id}/events", response_class=StreamingResponse, responses=EVENTS_DOC)
async def job_event_stream(
    job: JobDep,
    store: StoreDep,
    settings: SettingsDep,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID", max_length=32)] = None,
    last_event_id: Annotated[int | None, Query(ge=0, le=2**62, description="resume after this event id (for "
                                               "clients that cannot set the Last-Event-ID header)")] = None,
) -> StreamingResponse:
    """Server-Sent Events of a job, from the job store (any API replica serves any job):

    - ``status`` ``{"status": ...}`` at each change (queued, running (with ``attempt``), and the final one);
    - ``metric``: each logged training step ``{"step", "loss", "nfe_forward", "nfe_backward", "step_size", ...}``
      (``step_size``: mean accepted forward step, time units of the ODE's t);
    - ``evaluation``: each test evaluation ``{"step", "test_...", "eval_nfe_forward", ...}``;
    - ``checkpoint`` ``{"name", "step"}`` once the file can be downloaded;
    - ``result`` ``{"status", "metrics", "error"}`` just before the final status.

    Every event has an integer ``id:``; reconnecting with ``Last-Event-ID: <id>`` (header, as
    ``EventSource`` does, or the ``last_event_id`` query parameter; the header wins) continues
    right after it: no event lost, none repeated. A ``: heartbeat`` comment is sent after
    ``ODEFORGE_EVENTS_HEARTBEAT_S`` seconds of silence. The stream ends after the final ``status``
    event (at once when resumed after it) or when the job is deleted. Another API key's job: 404.
    """
    after = last_event_id or 0
    if last_event_id_header is not None:
        if not last_event_id_header.strip().isdigit() or int(last_event_id_header) > 2**62:
            raise ProblemError(422, "invalid-request", "Last-Event-ID must be an event id this stream sent",
                               errors=[{"field": "Last-Event-ID", "reason": "not a non-negative integer"}])
        after = int(last_event_id_header)
    stream = job_events(store, job, after_id=after, poll_s=settings.events_poll_s,
                        heartbeat_s=settings.events_heartbeat_s)
    # no-cache: a proxy must not store the stream; X-Accel-Buffering: nginx must not buffer it
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
