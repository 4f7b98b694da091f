"""Enqueueing training jobs: the API publishes ``worker.tasks.train(job_id)`` by name.

Publishing by name keeps torch and the training code out of the API process. A broker that cannot be
reached within ``broker_timeout_s`` raises :class:`BrokerUnavailable` (answered 503), never hangs.
"""

from __future__ import annotations

from celery import Celery

from worker.celery_app import TRAIN_TASK, make_celery
from service.settings import Settings


class BrokerUnavailable(RuntimeError):
    """The message broker could not be reached or refused the message."""


class Broker:
    """Thin publisher over a Celery app built from the same settings as the workers."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.celery: Celery = make_celery(settings)

    def enqueue_training(self, job_id: str) -> None:
        """Publish one training message for ``job_id``; raises BrokerUnavailable."""
        try:
            self.celery.send_task(
                TRAIN_TASK,
                args=[job_id],
                queue=self.settings.queue,
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
            )
        except Exception as exc:  # kombu OperationalError, redis ConnectionError, socket errors
            raise BrokerUnavailable(f"message broker unreachable: {exc}") from exc

    def ping(self) -> None:
        """Raise BrokerUnavailable unless the broker accepts a connection now."""
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=self.settings.broker_timeout_s)
        except Exception as exc:
            raise BrokerUnavailable(f"message broker unreachable: {exc}") from exc

    def close(self) -> None:
        self.celery.close()
