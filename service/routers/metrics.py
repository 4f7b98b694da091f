"""``/v1/jobs/{id}/metrics``: the per-step training history."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.deps import JobDep, JobServiceDep
from service.routers.jobs import PROBLEMS
from service.schemas import MetricsPublic

router = APIRouter(prefix="/jobs", tags=["metrics"])


@router.get("/{job_id}/metrics", response_model=MetricsPublic, responses=PROBLEMS)
def job_metrics(
    job: JobDep,
    jobs: JobServiceDep,
    since_step: Annotated[int | None, Query(ge=-1, le=2**62, description="only steps after this one (polling)")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    page_token: Annotated[str | None, Query(max_length=128)] = None,
) -> MetricsPublic:
    """Rows ``{"step", "loss", "nfe_forward", "nfe_backward", "step_size", "wall_seconds", ...}`` in step order
    (``step_size``: mean accepted step of the step's forward solves, in the time units of the ODE's t);
    evaluation steps also carry ``test_nll`` (nats) / ``test_bits_per_dim`` or ``test_accuracy``."""
    rows, token = jobs.history(job, since_step=since_step, limit=limit, page_token=page_token)
    return MetricsPublic(history=rows, next_page_token=token)
