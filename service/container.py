"""The long-lived objects one API process holds (built once in the app's lifespan)."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.artifacts import ArtifactStore, LocalArtifactStore
from jobs.leases import Reconciler
from jobs.queue import Broker
from jobs.settings import Settings
from jobs.store import JobStore
from service.batching import LogDensityBatcher
from service.inference import ModelCache
from service.inference_pool import InferencePool
from service.job_service import JobService
from service.observability import ApiMetrics
from service.storage import StorageGuard


@dataclass
class Services:
    settings: Settings
    store: JobStore
    artifacts: ArtifactStore
    broker: Broker
    jobs: JobService
    models: ModelCache
    metrics: ApiMetrics
    inference: InferencePool  # bounded threads + admission + per-request budgets (issue 14)
    batcher: LogDensityBatcher  # micro-batches log-density requests; drains run on ``inference``

    @classmethod
    def build(cls, settings: Settings, metrics: ApiMetrics) -> "Services":
        """Connect the job store (schema created on start), the artifact store and the broker publisher."""
        store = JobStore.from_settings(settings)
        artifacts = LocalArtifactStore(settings.artifact_dir)
        broker = Broker(settings)
        pool = InferencePool(settings.inference_workers, settings.inference_queue,
                             timeout_s=settings.inference_timeout_s, max_nfe=settings.inference_max_nfe)
        return cls(
            settings=settings,
            store=store,
            artifacts=artifacts,
            broker=broker,
            jobs=JobService(store, broker, artifacts, metrics, max_upload_bytes=settings.max_upload_bytes,
                            storage=StorageGuard(store, artifacts, quota_bytes=settings.owner_quota_bytes,
                                                 min_free_bytes=settings.min_free_bytes),
                            max_job_cost=settings.max_job_cost),
            # The API answers queries on CPU; GPUs belong to the workers.
            models=ModelCache(artifacts, settings.inference_cache_size, device="cpu"),
            metrics=metrics,
            inference=pool,
            batcher=LogDensityBatcher(executor=pool.executor),
        )

    def reconciler(self) -> Reconciler:
        """The thread that requeues jobs whose worker was lost (expired lease) and republishes lost messages."""
        s = self.settings
        return Reconciler(self.store.sessions, self.broker, every_s=s.reconcile_every_s, max_attempts=s.max_attempts,
                          requeue_queued_after_s=s.requeue_queued_after_s)

    def close(self) -> None:
        self.inference.close()  # running solves stop at their next step (no minutes-long shutdown)
        self.broker.close()
        self.store.close()
