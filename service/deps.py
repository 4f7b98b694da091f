"""Typed dependency aliases: routes take ``store: StoreDep``, ``job: JobDep`` ... as plain parameters."""

from __future__ import annotations

from typing import Annotated, Any, Callable

from fastapi import Depends, Path, Request

from jobs.artifacts import ArtifactStore
from jobs.queue import Broker
from jobs.settings import Settings
from jobs.store import JobStore
from jobs.tables import Job
from service.auth import Caller
from service.container import Services
from service.batching import LogDensityBatcher
from service.inference import ModelCache
from service.inference_pool import InferencePool
from service.job_service import JobService
from service.observability import ApiMetrics


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def _service(name: str) -> Callable[[Services], Any]:
    """A dependency returning the app's long-lived ``Services.<name>``."""

    def get(services: ServicesDep) -> Any:
        return getattr(services, name)

    get.__name__ = f"get_{name}"
    return get


SettingsDep = Annotated[Settings, Depends(_service("settings"))]
StoreDep = Annotated[JobStore, Depends(_service("store"))]
ArtifactsDep = Annotated[ArtifactStore, Depends(_service("artifacts"))]
BrokerDep = Annotated[Broker, Depends(_service("broker"))]
ModelsDep = Annotated[ModelCache, Depends(_service("models"))]
MetricsDep = Annotated[ApiMetrics, Depends(_service("metrics"))]
InferenceDep = Annotated[InferencePool, Depends(_service("inference"))]
BatcherDep = Annotated[LogDensityBatcher, Depends(_service("batcher"))]
JobServiceDep = Annotated[JobService, Depends(_service("jobs"))]
CallerDep = Annotated[Caller, Depends(Caller.of)]


def get_job(job_id: Annotated[str, Path(max_length=64)], jobs: JobServiceDep, caller: CallerDep) -> Job:
    """The job named in the path, or a 404 problem (also for another API key's job: existence is not leaked)."""
    return jobs.get(job_id, caller)


JobDep = Annotated[Job, Depends(get_job)]
