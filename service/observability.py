"""Prometheus metrics of the API (one registry per app, so several apps in one process do not clash)."""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.responses import Response


def route_template(request: Request) -> str:
    """``/v1/jobs/{job_id}`` for ``/v1/jobs/ab12..``: a bounded label set (ids would explode it).

    Included routers keep their own paths here, so the router prefix is recovered from the URL.
    """
    route = request.scope.get("route")
    template = getattr(route, "path", None)
    if template is None:
        return "unmatched"
    try:
        rendered = template.format(**request.scope.get("path_params", {}))
    except (KeyError, IndexError, ValueError):
        return template
    path = request.scope.get("path", "")
    return path[: len(path) - len(rendered)] + template if path.endswith(rendered) else template


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("odeforge_http_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("odeforge_http_request_seconds", "HTTP request latency (s)", ["method", "route"],
                                 registry=self.registry)
        self.jobs_submitted = Counter("odeforge_jobs_submitted_total", "Jobs accepted by POST /v1/jobs",
                                      registry=self.registry)
        self.jobs = Gauge("odeforge_jobs", "Jobs in the job store by status", ["status"], registry=self.registry)
        self.inference_points = Counter("odeforge_inference_points_total", "Points/samples/inputs served",
                                        ["kind"], registry=self.registry)
        self.inference_seconds = Histogram("odeforge_inference_seconds", "Model evaluation time (s)", ["kind"],
                                           registry=self.registry)
        self.broker_errors = Counter("odeforge_broker_errors_total", "Failed publishes to the broker",
                                     registry=self.registry)

    async def middleware(self, request: Request, call_next: Callable) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = route_template(request)
            self.requests.labels(request.method, route, str(status)).inc()
            self.latency.labels(request.method, route).observe(time.perf_counter() - start)
