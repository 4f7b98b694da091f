"""The job queue: the Celery app factory, the training task's name, and the publisher the API uses.

Long-job settings, set once here: late acks with prefetch 1 (a job leaves the queue only when it
has finished, and a worker holds no second job while it trains one), a broker visibility timeout
longer than the longest job (Redis would otherwise redeliver a still-running job to another worker),
requeue when a worker process is lost, no result backend (the job store is the source of truth).

The API publishes :data:`TRAIN_TASK` by name (``send_task``): it never imports the task's code, so
torch and the training stack stay out of the API process, and ``jobs`` never imports ``worker``.
A broker that cannot be reached within ``broker_timeout_s`` raises :class:`BrokerUnavailable`
(answered 503), never hangs. Nothing here reads the environment: every function takes ``Settings``.
"""

from __future__ import annotations

from typing import Sequence

from celery import Celery
from kombu import Queue

from jobs.settings import Settings

# The message's task name. Kept from the first release, so messages queued by an older API still
# reach the task (``worker.tasks.train`` registers itself under this name).
TRAIN_TASK = "worker.tasks.train"


def make_celery(settings: Settings, *, include: Sequence[str] = ()) -> Celery:
    """A Celery app for ``settings`` (broker, queue, visibility timeout).

    ``include``: task modules a worker imports when it starts (``["worker.tasks"]``); the API's
    publisher needs none.
    """
    app = Celery("odeforge", broker=settings.broker_url, include=list(include))
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


class BrokerUnavailable(RuntimeError):
    """The message broker could not be reached or refused the message."""


class Broker:
    """Publisher of training messages over a Celery app built from the same settings as the workers.

    Also what :func:`jobs.leases.reconcile` needs (:class:`jobs.leases.Publisher`): publish and
    the queue's depth.
    """

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

    def queue_depth(self) -> int:
        """Messages waiting in the job queue (not counting ones a worker holds unacknowledged).

        Raises what the transport raises when the broker is down (the reconciler logs and retries).
        """
        from kombu.exceptions import ChannelError

        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=self.settings.broker_timeout_s)
            try:
                return int(conn.default_channel.queue_declare(queue=self.settings.queue, passive=True).message_count)
            except ChannelError:  # Redis drops an empty list: the queue "does not exist" when it is empty
                return 0

    def close(self) -> None:
        self.celery.close()
