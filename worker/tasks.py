"""Celery tasks. Thin: the job id is the whole message; the job store holds everything else."""

from __future__ import annotations

from celery import shared_task
from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutting_down

from jobs.queue import TRAIN_TASK
from worker.runner import request_shutdown, run_job, worker_context


@shared_task(name=TRAIN_TASK, bind=True, acks_late=True, ignore_result=True, max_retries=None)
def train(self, job_id: str) -> str:
    """Train job ``job_id`` (see :func:`worker.runner.run_job`); returns its final status.

    When the worker shuts down mid-job, the job has been checkpointed and set back to queued; the
    message is rejected with requeue so the next worker picks it up and resumes. A job whose owner
    is at ``max_running_per_owner`` stays queued and its message is published again after
    ``owner_retry_s`` (meanwhile this worker takes other messages: another owner's jobs run).
    """
    status = run_job(job_id)
    if status == "requeued":
        raise Reject(f"worker shutting down; job {job_id} requeued", requeue=True)
    if status == "deferred":
        raise self.retry(countdown=worker_context().settings.owner_retry_s)
    return status


@worker_ready.connect
def _open_stores(**_: object) -> None:
    worker_context()  # create the schema and connect before the first job arrives


@worker_shutting_down.connect
def _stop_training(**_: object) -> None:
    request_shutdown()
