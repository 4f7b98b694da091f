"""The Celery application, built from :class:`service.settings.Settings` (never a hard-coded broker).

Long-job settings, set once here: late acks with prefetch 1 (a job leaves the queue only when it
has finished, and a worker holds no second job while it trains one), a broker visibility timeout
longer than the longest job (Redis would otherwise redeliver a still-running job to another worker),
requeue when a worker process is lost, no result backend (the job store is the source of truth).

Start a worker with ``odeforge worker`` (one process per device; the solo pool keeps CUDA out of
any forked parent) or ``celery -A worker.celery_app worker -P solo``.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from service.settings import Settings, get_settings

TRAIN_TASK = "worker.tasks.train"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings`` (broker, queue, visibility timeout)."""
    app = Celery("odeforge", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        task_default_queue=settings.queue,
        task_queues=[Queue(settings.queue)],
        task_routes={TRAIN_TASK: {"queue": settings.queue}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "socket_connect_timeout": settings.broker_timeout_s,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for Redis to come back, it does not exit
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


celery_app = make_celery(get_settings())
app = celery_app  # `celery -A worker.celery_app` finds `app`
