"""Typed dependency aliases: routes take ``store: StoreDep``, ``job: JobDep`` ... as plain parameters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from jobs.artifacts import ArtifactStore
from jobs.queue import Broker
from jobs.settings import Settings
from jobs.store import JobStore
from jobs.tables import Job
from service.auth import Caller
from service.container import Services
from service.inference import ModelCache
from service.job_service import JobService
from service.observability import ApiMetrics


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_settings_dep(services: ServicesDep) -> Settings:
    return services.settings


def get_store(services: ServicesDep) -> JobStore:
    return services.store


def get_artifacts(services: ServicesDep) -> ArtifactStore:
    return services.artifacts


def get_broker(services: ServicesDep) -> Broker:
    return services.broker


def get_models(services: ServicesDep) -> ModelCache:
    return services.models


def get_metrics(services: ServicesDep) -> ApiMetrics:
    return services.metrics


def get_job_service(services: ServicesDep) -> JobService:
    return services.jobs


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StoreDep = Annotated[JobStore, Depends(get_store)]
ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]
BrokerDep = Annotated[Broker, Depends(get_broker)]
ModelsDep = Annotated[ModelCache, Depends(get_models)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
JobServiceDep = Annotated[JobService, Depends(get_job_service)]
CallerDep = Annotated[Caller, Depends(Caller.of)]


def get_job(job_id: Annotated[str, Path(max_length=64)], jobs: JobServiceDep, caller: CallerDep) -> Job:
    """The job named in the path, or a 404 problem (also for another API key's job: existence is not leaked)."""
    return jobs.get(job_id, caller)


JobDep = Annotated[Job, Depends(get_job)]
