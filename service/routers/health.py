"""``/healthz`` (process alive), ``/readyz`` (database, broker, artifact disk, workers), ``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jobs.queue import BrokerUnavailable
from jobs.workers import stale_after_s
from service.deps import ArtifactsDep, BrokerDep, MetricsDep, SettingsDep, StoreDep
from service.errors import ProblemError
from service.schemas import Problem

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: answers as long as the event loop runs (touches no dependency)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": Problem, "description": "a dependency is down or the disk is low"}})
def readyz(store: StoreDep, broker: BrokerDep, artifacts: ArtifactsDep, settings: SettingsDep) -> dict[str, Any]:
    """Readiness: 200 ``{"database": "ok", "broker": "ok", "artifacts": "ok", "workers": "ok",
    "artifact_free_bytes": <int>, "live_workers": <int>}``, else 503 ``not-ready`` with one
    ``{"field", "reason"}`` per failing check:

    - ``database`` / ``broker``: unreachable (the exception's class named);
    - ``artifacts``: the artifact directory's disk has less than ``ODEFORGE_MIN_FREE_BYTES`` free
      (uploads and submissions are then 507) or cannot be read;
    - ``workers``: no worker consuming this queue wrote its heartbeat within three
      ``ODEFORGE_WORKER_HEARTBEAT_S`` periods (jobs would wait in the queue). Reported always; it
      makes the answer 503 only with ``ODEFORGE_READY_REQUIRES_WORKER`` on (the default). Read
      from the database, so it is ``unknown`` while the database is down.
    """
    checks: dict[str, str] = {}
    facts: dict[str, int] = {}
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
    try:
        free = facts["artifact_free_bytes"] = artifacts.free_bytes()
        checks["artifacts"] = ("ok" if free >= settings.min_free_bytes else
                               f"low: {free} bytes free, below ODEFORGE_MIN_FREE_BYTES={settings.min_free_bytes}")
    except OSError as exc:
        checks["artifacts"] = f"unreadable: {type(exc).__name__}"
    if checks["database"] == "ok":
        window = stale_after_s(settings.worker_heartbeat_s)
        try:
            live = facts["live_workers"] = len(store.live_workers(settings.queue, window))
            checks["workers"] = "ok" if live else (f"none: no worker of queue {settings.queue!r} "
                                                   f"beat within {window:g} s")
        except Exception as exc:
            checks["workers"] = f"unknown: {type(exc).__name__}"
    else:
        checks["workers"] = "unknown: database unreachable"
    optional = set() if settings.ready_requires_worker else {"workers"}
    down = [k for k, v in checks.items() if v != "ok" and k not in optional
            and not (k == "workers" and checks["database"] != "ok")]  # one cause, named once
    if down:
        raise ProblemError(503, "not-ready", f"not ready: {', '.join(down)}",
                           errors=[{"field": k, "reason": checks[k]} for k in down])
    return {**checks, **facts}


@router.get("/metrics", response_class=Response)
def prometheus_metrics(metrics: MetricsDep, store: StoreDep) -> Response:
    """Prometheus text format: request counts/latency, jobs by status, inference time."""
    try:
        for status, n in store.count_by_status().items():
            metrics.jobs.labels(status).set(n)
    except Exception:  # the scrape still succeeds with the process metrics when the DB is down
        pass
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
