"""``/healthz`` (process alive), ``/readyz`` (database and broker reachable), ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jobs.queue import BrokerUnavailable
from service.deps import BrokerDep, MetricsDep, StoreDep
from service.errors import ProblemError
from service.schemas import Problem

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: answers as long as the event loop runs (touches no dependency)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": Problem, "description": "database or broker unreachable"}})
def readyz(store: StoreDep, broker: BrokerDep) -> dict[str, str]:
    """Readiness: 200 ``{"database": "ok", "broker": "ok"}``, else 503 naming what is down."""
    checks: dict[str, str] = {}
    try:
        store.ping()
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means "not ready"
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        broker.ping()
        checks["broker"] = "ok"
    except BrokerUnavailable as exc:
        checks["broker"] = f"unreachable: {exc.__cause__.__class__.__name__ if exc.__cause__ else exc}"
    down = [k for k, v in checks.items() if v != "ok"]
    if down:
        raise ProblemError(503, "not-ready", f"not ready: {', '.join(down)} unreachable",
                           errors=[{"field": k, "reason": checks[k]} for k in down])
    return checks


@router.get("/metrics", response_class=Response)
def prometheus_metrics(metrics: MetricsDep, store: StoreDep) -> Response:
    """Prometheus text format: request counts/latency, jobs by status, inference time."""
    try:
        for status, n in store.count_by_status().items():
            metrics.jobs.labels(status).set(n)
    except Exception:  # the scrape still succeeds with the process metrics when the DB is down
        pass
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
