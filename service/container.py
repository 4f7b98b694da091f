"""The long-lived objects one API process holds (built once in the app's lifespan)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine

from service.artifacts import ArtifactStore, LocalArtifactStore
from service.broker import Broker
from service.db import init_db, make_engine, make_sessionmaker
from service.inference import ModelCache
from service.observability import ApiMetrics
from service.settings import Settings
from service.store import JobStore


@dataclass
class Services:
    settings: Settings
    engine: Engine
    store: JobStore
    artifacts: ArtifactStore
    broker: Broker
    models: ModelCache
    metrics: ApiMetrics

    @classmethod
    def build(cls, settings: Settings, metrics: ApiMetrics) -> "Services":
        engine = make_engine(settings.database_url)
        init_db(engine)
        artifacts = LocalArtifactStore(settings.artifact_dir)
        return cls(
            settings=settings,
            engine=engine,
            store=JobStore(make_sessionmaker(engine), lease_s=settings.lease_s, max_attempts=settings.max_attempts),
            artifacts=artifacts,
            broker=Broker(settings),
            # The API answers queries on CPU; GPUs belong to the workers.
            models=ModelCache(artifacts, settings.inference_cache_size, device="cpu"),
            metrics=metrics,
        )

    def close(self) -> None:
        self.broker.close()
        self.engine.dispose()
