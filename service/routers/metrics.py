"""``/v1/jobs/{id}/metrics``: the per-step training history."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service import pagination
from service.deps import JobDep, StoreDep
from service.routers.jobs import PROBLEMS
from service.schemas import MetricsPublic

router = APIRouter(prefix="/jobs", tags=["metrics"])


@router.get("/{job_id}/metrics", response_model=MetricsPublic, responses=PROBLEMS)
def job_metrics(
    job: JobDep,
    store: StoreDep,
    since_step: Annotated[int | None, Query(ge=-1, le=2**62, description="only steps after this one (polling)")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    page_token: Annotated[str | None, Query(max_length=128)] = None,
) -> MetricsPublic:
    """Rows ``{"step", "loss", "nfe_forward", "nfe_backward", "wall_seconds", ...}`` in step order;
    evaluation steps also carry ``test_nll`` (nats) / ``test_bits_per_dim`` or ``test_accuracy``."""
    after = pagination.decode("metrics", page_token)
    if after is None:
        after = since_step if since_step is not None else -1
    rows, more = store.metrics_history(job, after_step=after, limit=limit)
    return MetricsPublic(history=rows, next_page_token=pagination.encode("metrics", more) if more is not None else None)
