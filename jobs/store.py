"""The job store: every read and write of job state, shared by the API and the workers.

Worker writes are *fenced*: ``claim`` bumps the job's ``token`` and returns it, and every later write
(``record``, ``finish``, ``release``, ``truncate_metrics_after``) only applies while the row still
carries that token and is ``running`` (:func:`jobs.leases.fenced`).
A worker whose claim was superseded (or whose job was cancelled) sees ``False`` and stops, so two
workers never both write one job's history.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from jobs import leases
from jobs.leases import fenced
from jobs.settings import Settings
from jobs.status import JobStatus
from jobs.tables import Dataset, Job, JobMetric, init_db, make_engine, make_sessionmaker, utcnow


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` was reused with a different job spec."""


@dataclass
class CancelResult:
    job: Job | None
    conflict: bool = False  # the job had already finished (succeeded/failed)


class JobStore:
    """Job rows, metrics rows and uploaded-dataset rows behind one small API (thread-safe)."""

    def __init__(self, sessions: sessionmaker, *, lease_s: float = 600.0, max_attempts: int = 3,
                 max_running_per_owner: int = 0):
        self._sessions = sessions
        self.lease = timedelta(seconds=lease_s)
        self.max_attempts = max_attempts
        self.max_running_per_owner = max_running_per_owner  # 0: no fairness limit (jobs.leases.claim)
        self.last_claim_reason: str | None = None  # why the last claim() returned None (worker logs)

    @classmethod
    def from_settings(cls, settings: Settings, *, idle_in_transaction_timeout_s: float | None = None) -> "JobStore":
        """Connect to ``settings.database_url`` and create the schema if it is missing.

        ``idle_in_transaction_timeout_s``: see :func:`jobs.tables.make_engine` (workers pass half
        their lease). Raises SQLAlchemy's ``OperationalError`` when the database is unreachable.
        """
        engine = make_engine(settings.database_url, idle_in_transaction_timeout_s=idle_in_transaction_timeout_s)
        init_db(engine)
        return cls(make_sessionmaker(engine), lease_s=settings.lease_s, max_attempts=settings.max_attempts,
                   max_running_per_owner=settings.max_running_per_owner)

    @property
    def sessions(self) -> sessionmaker:
        return self._sessions

    def close(self) -> None:
        """Close the pooled connections (the store reconnects if used again)."""
        self._sessions.kw["bind"].dispose()

    # ---- jobs: API side -------------------------------------------------------------------------
    def create_job(
        self, spec: dict, *, idempotency_key: str | None = None, owner: str | None = None
    ) -> tuple[Job, bool]:
        """Insert a queued job; with an idempotency key already used for the same spec, return that job.

        Returns ``(job, created)``. Raises ``IdempotencyConflict`` if the key was used for another spec.
        """
        if idempotency_key is not None:
            existing = self._by_key(idempotency_key)
            if existing is not None:
                return self._replay(existing, spec), False
        job = Job(
            id=uuid.uuid4().hex,
            status=JobStatus.QUEUED,
            spec=spec,
            model_type=spec["model"]["type"],
            progress=0.0,
            step=0,
            metrics={},
            idempotency_key=idempotency_key,
            owner=owner,
            created_at=utcnow(),
        )
        try:
            with self._sessions.begin() as s:
                s.add(job)
        except IntegrityError:
            # Two submissions with one key raced; the other insert won.
            existing = self._by_key(idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return self._replay(existing, spec), False
        return job, True

    def _by_key(self, key: str) -> Job | None:
        with self._sessions() as s:
            return s.scalar(select(Job).where(Job.idempotency_key == key))

    @staticmethod
    def _replay(job: Job, spec: dict) -> Job:
        if job.spec != spec:
            raise IdempotencyConflict(job.id)
        return job

    def delete_job(self, job_id: str) -> None:
        """Remove a job that could not be enqueued (the submission is answered 503 and leaves nothing)."""
        with self._sessions.begin() as s:
            s.execute(delete(Job).where(Job.id == job_id))

    def get_job(self, job_id: str) -> Job | None:
        with self._sessions() as s:
            return s.scalar(select(Job).where(Job.id == job_id))

    def list_jobs(
        self, *, status: JobStatus | None = None, limit: int = 50, before_seq: int | None = None, owner: str | None = None
    ) -> tuple[list[Job], int | None]:
        """Newest first (only ``owner``'s when given). Returns ``(jobs, next_before_seq)``; None on the last page."""
        q = select(Job).order_by(Job.seq.desc()).limit(limit + 1)
        if owner is not None:
            q = q.where(Job.owner == owner)
        if status is not None:
            q = q.where(Job.status == status)
        if before_seq is not None:
            q = q.where(Job.seq < before_seq)
        with self._sessions() as s:
            rows = list(s.scalars(q))
        if len(rows) > limit:
            return rows[:limit], rows[limit - 1].seq
        return rows, None

    def request_cancel(self, job_id: str) -> CancelResult:
        """Cancel a job: a queued one at once, a running one cooperatively (its worker reads the flag
        every ``cancel_poll_s``, between training steps and inside solves; if the worker died, the
        reconciler ends the job ``cancelled``)."""
        with self._sessions.begin() as s:
            job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
            if job is None:
                return CancelResult(None)
            if job.status == JobStatus.QUEUED:
                job.status = JobStatus.CANCELLED
                job.cancel_requested = True
                job.finished_at = utcnow()
            elif job.status == JobStatus.RUNNING:
                job.cancel_requested = True
            elif job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                return CancelResult(job, conflict=True)
        return CancelResult(self.get_job(job_id))

    def count_by_status(self) -> dict[JobStatus, int]:
        """Number of jobs in each status (every status present, zeros included)."""
        with self._sessions() as s:
            rows = s.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        counts = {k: 0 for k in JobStatus}
        counts.update({status: n for status, n in rows})
        return counts

    def metrics_history(self, job: Job, *, after_step: int, limit: int) -> tuple[list[dict], int | None]:
        """Metric rows with ``step > after_step`` in step order; second value: last step if more remain."""
        q = (
            select(JobMetric)
            .where(JobMetric.job_seq == job.seq, JobMetric.step > after_step)
            .order_by(JobMetric.step)
            .limit(limit + 1)
        )
        with self._sessions() as s:
            rows = list(s.scalars(q))
        out = [{**r.values, "step": r.step} for r in rows[:limit]]
        more = rows[limit - 1].step if len(rows) > limit else None
        return out, more

    # ---- jobs: worker side (fenced) ------------------------------------------------------------
    def claim(self, job_id: str) -> tuple[Job, int] | None:
        """Mark a queued job (or a running one whose lease expired) as running under a new fencing token.

        Returns ``(job, token)``, or None when the job is unknown, finished, cancelled, leased by a live
        worker, has used up its attempts (then it is failed; see :mod:`jobs.leases`) or its owner is
        at ``max_running_per_owner`` (``last_claim_reason == "owner-limit"``: it stays queued).
        """
        result = leases.claim(self._sessions, job_id, lease=self.lease, max_attempts=self.max_attempts,
                              max_running_per_owner=self.max_running_per_owner)
        self.last_claim_reason = result.reason
        if result.token is None:
            return None
        return self.get_job(job_id), result.token

    def record(
        self,
        job: Job,
        token: int,
        rows: Iterable[dict],
        *,
        step: int,
        total_steps: int | None,
        latest: dict,
    ) -> bool:
        """Write progress, the latest metrics and metric rows (merged by step) in one transaction.

        Returns False (and writes nothing) when the worker no longer holds the job.
        """
        rows = list(rows)
        progress = min(1.0, step / total_steps) if total_steps else 0.0
        with self._sessions.begin() as s:
            res = s.execute(
                update(Job)
                .where(fenced(job.seq, token))
                .values(step=step, total_steps=total_steps, progress=progress, metrics=latest, updated_at=utcnow(),
                        lease_expires_at=utcnow() + self.lease)
            )
            if res.rowcount != 1:
                return False
            if rows:
                steps = [r["step"] for r in rows]
                existing = {
                    m.step: m
                    for m in s.scalars(select(JobMetric).where(JobMetric.job_seq == job.seq, JobMetric.step.in_(steps)))
                }
                for r in rows:
                    values = {k: v for k, v in r.items() if k != "step"}
                    if r["step"] in existing:
                        m = existing[r["step"]]
                        m.values = {**m.values, **values}
                    else:
                        m = JobMetric(job_seq=job.seq, step=r["step"], values=values)
                        s.add(m)
                        existing[r["step"]] = m
        return True

    def truncate_metrics_after(self, job: Job, token: int, step: int) -> bool:
        """Drop metric rows past ``step`` (a resumed job replays them from its checkpoint)."""
        with self._sessions.begin() as s:
            # FOR UPDATE: a claim that supersedes ours waits until the delete has committed (PostgreSQL)
            if s.scalar(select(Job.seq).where(fenced(job.seq, token)).with_for_update()) is None:
                return False
            s.execute(delete(JobMetric).where(JobMetric.job_seq == job.seq, JobMetric.step > step))
        return True

    def should_stop(self, job: Job, token: int) -> bool:
        """True when a cancel was requested or another claim superseded ours (one indexed read: the
        worker calls it at most every ``cancel_poll_s``, also from inside solves)."""
        with self._sessions() as s:
            cancel_requested = s.scalar(select(Job.cancel_requested).where(fenced(job.seq, token)))
        return cancel_requested is None or bool(cancel_requested)

    def finish(
        self,
        job: Job,
        token: int,
        status: JobStatus,
        *,
        latest: dict | None = None,
        error: tuple[str, str] | None = None,
    ) -> bool:
        """Set the final status (succeeded/failed/cancelled); fenced like ``record``.

        Raises ValueError for a status that is not final (``queued``/``running``: see ``release``).
        """
        status = JobStatus(status)
        if not status.terminal:
            raise ValueError(f"finish() takes a final status, not {status!r}")
        values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "updated_at": utcnow(),
                                  "lease_expires_at": None}
        if latest is not None:
            values["metrics"] = latest
        if status == JobStatus.SUCCEEDED:
            values["progress"] = 1.0
        if error is not None:
            values["error_type"], values["error_detail"] = error[0][:128], error[1][:10_000]
        with self._sessions.begin() as s:
            res = s.execute(update(Job).where(fenced(job.seq, token)).values(**values))
            return res.rowcount == 1

    def release(self, job: Job, token: int) -> bool:
        """Put a running job back to ``queued`` (its worker is shutting down); fenced like ``record``."""
        return leases.release(self._sessions, job.seq, token)

    # ---- uploaded data sets --------------------------------------------------------------------
    def create_dataset(self, dataset_id: str, shape: list[int], filename: str | None, owner: str | None = None) -> Dataset:
        ds = Dataset(id=dataset_id, shape=shape, filename=filename, owner=owner, created_at=utcnow())
        with self._sessions.begin() as s:
            s.add(ds)
        return ds

    def get_dataset(self, dataset_id: str) -> Dataset | None:
        with self._sessions() as s:
            return s.get(Dataset, dataset_id)

    def ping(self) -> None:
        """Raise if the database is unreachable."""
        with self._sessions() as s:
            s.execute(select(1))
