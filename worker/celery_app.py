"""The worker's Celery app, built from :class:`jobs.settings.Settings` on first use, never at import.

The app itself comes from :func:`jobs.queue.make_celery` (the API's publisher uses the same factory,
so both sides agree on broker, queue and visibility timeout). Start a worker with ``odeforge worker``
(one process per device; the solo pool keeps CUDA out of any forked parent), ``python -m worker``,
or ``celery -A worker.celery_app worker -P solo``.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from jobs.queue import make_celery
from jobs.settings import get_settings


@lru_cache(maxsize=1)
def worker_app() -> Celery:
    """This process's Celery app, with the training task registered (settings read on the first call)."""
    app = make_celery(get_settings(), include=["worker.tasks"])
    import worker.tasks  # noqa: F401 - registers `train` (a shared task) and the shutdown signal handlers

    return app


def __getattr__(name: str) -> Celery:
    # `celery -A worker.celery_app` looks up `app` (or `celery_app`); build it only then.
    if name in ("app", "celery_app"):
        return worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
