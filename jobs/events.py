"""A job's event log: what ``GET /v1/jobs/{id}/events`` streams (Server-Sent Events).

Every event is a ``job_events`` row appended in the same transaction as the write it describes,
by whoever makes that write: the job store (queued, metric rows, evaluations, checkpoints, the
result and the final status, a cancel), the lease functions (running, requeued, failed as a poison
job). Readers poll ``id > last`` (:func:`read`), so any API replica streams any job and a client
resumes exactly where it stopped (``Last-Event-ID``), on SQLite and PostgreSQL.

Event types and their ``data``:

- ``status``: ``{"status": "queued"|"running"|"succeeded"|"failed"|"cancelled"}`` (running also
  ``"attempt"``; queued after a lost worker ``"reason"``);
- ``metric``: one logged training step, ``{"step", "loss", "nfe_forward", "nfe_backward", ...}``;
- ``evaluation``: one evaluation on the test split, ``{"step", "test_...", "eval_nfe_forward", ...}``;
- ``checkpoint``: ``{"name": "step-000100.safetensors", "step": 100}``;
- ``result``: just before the final status: ``{"status", "metrics" (latest values), "error"
  ({"type", "detail"} or null)}``.

A resumed job (new worker after a lost one) replays the steps after its last checkpoint: their
``metric`` events appear again, after a ``status`` running event.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from jobs.status import JobStatus
from jobs.tables import JobEvent, utcnow

TYPES = ("status", "metric", "evaluation", "checkpoint", "result")


def append(session: Session, job_seq: int, type: str, data: dict[str, Any]) -> None:
    """Add one event to job ``job_seq``'s log inside ``session``'s transaction.

    The caller must hold the job's row (it has just updated it, or selected it FOR UPDATE): that is
    what keeps a job's events committed in ``id`` order. Raises ValueError for an unknown ``type``.
    """
    if type not in TYPES:
        raise ValueError(f"unknown event type {type!r}; expected one of {', '.join(TYPES)}")
    session.execute(insert(JobEvent).values(job_seq=job_seq, type=type, data=data, created_at=utcnow()))


def status(session: Session, job_seq: int, status: JobStatus, **extra: Any) -> None:
    """A ``status`` event: the job is now ``status``."""
    append(session, job_seq, "status", {"status": JobStatus(status).value, **extra})


def terminal(session: Session, job_seq: int, status: JobStatus, *, metrics: dict | None,
             error: tuple[str, str] | None) -> None:
    """The ``result`` event followed by the final ``status`` event (the stream ends after it)."""
    err = {"type": error[0], "detail": error[1]} if error else None
    append(session, job_seq, "result", {"status": JobStatus(status).value, "metrics": metrics or {}, "error": err})
    append(session, job_seq, "status", {"status": JobStatus(status).value})


def read(sessions: sessionmaker, job_seq: int, *, after_id: int, limit: int = 500) -> list[tuple[int, str, dict]]:
    """Events of job ``job_seq`` with ``id > after_id``, oldest first: ``[(id, type, data), ...]``."""
    q = (select(JobEvent.id, JobEvent.type, JobEvent.data)
         .where(JobEvent.job_seq == job_seq, JobEvent.id > after_id).order_by(JobEvent.id).limit(limit))
    with sessions() as s:
        return [(int(i), t, d) for i, t, d in s.execute(q)]
