"""Typed dependency aliases: routes take ``store: StoreDep``, ``job: JobDep`` ... as plain parameters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from service.artifacts import ArtifactStore
from service.auth import owns
from service.broker import Broker
from service.container import Services
from service.db import Job
from service.errors import ProblemError
from service.inference import ModelCache
from service.observability import ApiMetrics
from service.settings import Settings
from service.store import JobStore


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


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StoreDep = Annotated[JobStore, Depends(get_store)]
ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]
BrokerDep = Annotated[Broker, Depends(get_broker)]
ModelsDep = Annotated[ModelCache, Depends(get_models)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]


def get_job(job_id: Annotated[str, Path(max_length=64)], store: StoreDep, request: Request) -> Job:
    """The job named in the path, or a 404 problem (also for another API key's job: existence is not leaked)."""
    job = store.get_job(job_id)
    if job is None or not owns(request, job.owner):
        raise ProblemError(404, "job-not-found", f"no job with id {job_id!r}")
    return job


JobDep = Annotated[Job, Depends(get_job)]
