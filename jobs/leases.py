"""Job leases: who trains a job, for how long, and what happens when that worker disappears.

A worker *claims* a job: one conditional UPDATE sets it ``running``, bumps its fencing ``token``,
counts an attempt and sets ``lease_expires_at = now + lease``. While it trains, the worker renews the
lease (a heartbeat thread, :class:`LeaseKeeper`) and every write it makes (metric rows, progress,
final status) is conditioned on the token it got (Kleppmann's fencing token), so a worker that was
paused, partitioned or superseded cannot write after another one took the job over. That condition
is :func:`fenced`, the one place it is written; every other transition here is the same
compare-and-set on the ``(token, status)`` a pass has just read.

A lease that is not renewed expires: the worker was killed (SIGKILL, OOM), its machine died or it
hangs. :func:`reconcile` (run periodically by the API, :class:`Reconciler`) puts such jobs back to
``queued`` under a new token and publishes a new message, so another worker resumes them from
their last checkpoint. A job whose workers were lost ``max_attempts`` times is a *poison job*
(it kills or hangs whatever trains it): it ends ``failed`` with :data:`ATTEMPTS_EXHAUSTED`.

The same pass republishes queued jobs whose message the broker has lost (Redis restarted without
persistence): when the queue holds fewer messages than there are queued jobs, queued jobs older
than ``requeue_queued_after_s`` are published again. Duplicate messages are harmless: a claim only
takes a ``queued`` job or a ``running`` one whose lease has expired, so a second message for a job
that is already training is skipped.

A job with a cancel request never goes back to the queue: when its worker died before honouring
the request, the reconciler (or a claim of a redelivered message) ends it ``cancelled``.

Fairness: a claim may be limited to ``max_running_per_owner`` running jobs per owner
(:func:`owner_may_start`, part of the claim's UPDATE); a refused claim leaves the job queued and
the worker republishes its message after a delay (``worker.tasks``).

Every transition is an optimistic compare-and-set on ``(token, status)``; it is correct on SQLite
(no ``SELECT ... FOR UPDATE``) and PostgreSQL, and with several API replicas reconciling at once.

Renewal runs in its own thread (:class:`LeaseKeeper`), not between training steps: one step (or one
evaluation on a large test set) may take longer than the lease, and a worker that is merely slow must
not look dead. The thread dies with the process, so a SIGKILLed or crashed worker stops renewing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import ColumnElement, and_, exists, func, not_, select, text, update
from sqlalchemy.exc import OperationalError

from jobs.status import TERMINAL, JobStatus
from jobs.tables import Job, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import sessionmaker

log = logging.getLogger("odeforge.leases")

ATTEMPTS_EXHAUSTED = "JobAttemptsExhausted"


class Publisher(Protocol):
    """What the reconciler needs of :class:`jobs.queue.Broker`."""

    def enqueue_training(self, job_id: str) -> None: ...

    def queue_depth(self) -> int: ...


def _exhausted(attempts: int, max_attempts: int, now: datetime) -> dict:
    """Column values of a job failed as a poison job (its lease expired ``attempts`` times)."""
    detail = (f"gave up after {attempts} attempts (limit ODEFORGE_MAX_ATTEMPTS={max_attempts}): each time, the worker "
              f"training this job stopped renewing its lease without finishing it (killed, out of memory, or hung)")
    return dict(status=JobStatus.FAILED, token=Job.token + 1, lease_expires_at=None, finished_at=now, updated_at=now,
                error_type=ATTEMPTS_EXHAUSTED, error_detail=detail)


def fenced(job_seq: int, token: int, status: JobStatus = JobStatus.RUNNING) -> ColumnElement[bool]:
    """The fencing predicate: row ``job_seq`` still carries ``token`` and ``status``.

    A worker may write job ``job_seq`` only under ``fenced(job_seq, token)``: while the job is
    ``running`` under the token its claim returned (Kleppmann, "How to do distributed locking",
    2016: a fencing token checked by the storage). Every claim, requeue and failure bumps the token,
    so once any of them has happened, an UPDATE under this predicate matches no row. The reconciler
    and the claim use it with the ``(token, status)`` they have just read, as a compare-and-set.
    """
    return and_(Job.seq == job_seq, Job.token == token, Job.status == status)


@dataclass
class Claim:
    """Outcome of :func:`claim`: ``token`` is set when the caller now holds the job."""

    token: int | None
    # "claimed" | "unknown" | "finished" | "cancelled" | "leased" | "exhausted" | "raced" | "owner-limit"
    reason: str


def _cancelled(now: datetime) -> dict:
    """Column values of a job whose cancel request is honoured without a worker (its worker died)."""
    return dict(status=JobStatus.CANCELLED, token=Job.token + 1, lease_expires_at=None, finished_at=now, updated_at=now)


def owner_may_start(seq: int, owner: str, limit: int, now: datetime) -> ColumnElement[bool]:
    """The fairness predicate of a claim: job ``seq`` of ``owner`` may start when fewer than ``limit``
    other jobs of that owner are running under a live lease and no older job of the owner is still
    queued (so an owner's jobs start in submission order). One SQL condition: it goes into the
    claim's UPDATE, evaluated atomically with it."""
    others = select(func.count()).select_from(Job).where(
        Job.owner == owner, Job.status == JobStatus.RUNNING, Job.seq != seq,
        Job.lease_expires_at.is_not(None), Job.lease_expires_at > now).scalar_subquery()
    older = exists().where(Job.owner == owner, Job.status == JobStatus.QUEUED, Job.seq < seq)
    return and_(others < limit, not_(older))


def _lock_owner(session, owner: str) -> None:
    """PostgreSQL: serialize the claims of one owner until the transaction ends (two claims of one
    owner at once could each count the other as not yet running under READ COMMITTED). SQLite runs
    one writer at a time already."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(owner, 14))))


def claim(sessions: "sessionmaker", job_id: str, *, lease: timedelta, max_attempts: int,
          max_running_per_owner: int = 0) -> Claim:
    """Take job ``job_id`` for one training attempt.

    Claimable: a ``queued`` job, or a ``running`` one whose lease has expired (its worker is gone and
    the message was redelivered before the reconciler saw it). A job already at ``max_attempts`` is
    failed with :data:`ATTEMPTS_EXHAUSTED` instead; a job with a cancel request ends ``cancelled``
    (its worker died before honouring it). With ``max_running_per_owner`` > 0 a job whose owner
    is at that limit (:func:`owner_may_start`) stays queued: ``owner-limit`` (the caller retries
    later). Never raises for a lost race: two workers claiming one job at the same moment get one
    ``claimed`` and one ``raced``.
    """
    now = utcnow()
    with sessions.begin() as s:
        row = s.execute(
            select(Job.seq, Job.status, Job.token, Job.attempts, Job.lease_expires_at, Job.cancel_requested,
                   Job.owner)
            .where(Job.id == job_id)
        ).first()
        if row is None:
            return Claim(None, "unknown")
        if row.status in TERMINAL:
            return Claim(None, "finished")
        if row.status == JobStatus.RUNNING and row.lease_expires_at is not None and row.lease_expires_at > now:
            return Claim(None, "leased")  # a duplicate message while another worker trains it
        same = fenced(row.seq, row.token, row.status)
        if row.cancel_requested:
            s.execute(update(Job).where(same).values(**_cancelled(now)))
            return Claim(None, "cancelled")
        if row.attempts >= max_attempts:
            res = s.execute(update(Job).where(same).values(**_exhausted(row.attempts, max_attempts, now)))
            return Claim(None, "exhausted" if res.rowcount == 1 else "raced")
        if max_running_per_owner > 0 and row.owner is not None:
            _lock_owner(s, row.owner)
            fair = owner_may_start(row.seq, row.owner, max_running_per_owner, now)
            if not s.scalar(select(fair)):
                return Claim(None, "owner-limit")
            same = and_(same, fair)
        res = s.execute(update(Job).where(same).values(
            status=JobStatus.RUNNING, token=Job.token + 1, attempts=Job.attempts + 1, updated_at=now,
            lease_expires_at=now + lease, started_at=func.coalesce(Job.started_at, now)))
        if res.rowcount != 1:
            return Claim(None, "raced")
    return Claim(row.token + 1, "claimed")


def renew(sessions: "sessionmaker", job_seq: int, token: int, lease: timedelta) -> bool:
    """Extend the lease of a job the caller holds; False when the claim is no longer ours."""
    now = utcnow()
    with sessions.begin() as s:
        res = s.execute(update(Job).where(fenced(job_seq, token)).values(lease_expires_at=now + lease))
        return res.rowcount == 1


def release(sessions: "sessionmaker", job_seq: int, token: int) -> bool:
    """Hand a running job back to the queue (graceful worker shutdown).

    The attempt is given back as well: an operator stopping a worker is not the job's fault, so a
    job that is moved between workers many times never counts as a poison job.
    """
    with sessions.begin() as s:
        res = s.execute(
            update(Job)
            .where(fenced(job_seq, token))
            .values(status=JobStatus.QUEUED, token=Job.token + 1, attempts=Job.attempts - 1, lease_expires_at=None,
                    updated_at=utcnow())
        )
        return res.rowcount == 1


@dataclass
class ReconcileReport:
    requeued: list[str] = field(default_factory=list)  # lease expired: back to queued, message published
    failed: list[str] = field(default_factory=list)  # lease expired at the attempt limit: poison job
    cancelled: list[str] = field(default_factory=list)  # lease expired with a cancel request: cancelled
    republished: list[str] = field(default_factory=list)  # queued, but the broker had lost the message
    unpublished: list[str] = field(default_factory=list)  # requeued but the broker is down (retried later)
    locked: list[str] = field(default_factory=list)  # row locked by a stuck holder: tried again next pass


LOCK_WAIT_S = 2  # longest a pass waits for one job's row lock before moving on (PostgreSQL)


def _bounded_lock_wait(session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_WAIT_S}s'"))


def _is_lock_timeout(exc: OperationalError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == "55P03"  # lock_not_available


def reconcile(
    sessions: "sessionmaker",
    publisher: Publisher,
    *,
    max_attempts: int,
    requeue_queued_after: timedelta,
    now: datetime | None = None,
    batch: int = 500,
) -> ReconcileReport:
    """One pass: requeue (or fail) running jobs whose lease has expired (a job with a cancel request
    ends ``cancelled`` instead: nothing is left to cancel); republish lost queued jobs.

    Safe to run concurrently from several processes: each transition is a compare-and-set on the
    job's token, and only the process that won it publishes. Broker errors are not raised: the job
    stays ``queued`` and a later pass republishes it.
    """
    now = now or utcnow()
    report = ReconcileReport()
    with sessions() as s:
        expired = s.execute(
            select(Job.seq, Job.id, Job.token, Job.attempts, Job.cancel_requested)
            .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at.is_not(None), Job.lease_expires_at < now)
            .order_by(Job.seq).limit(batch)
        ).all()
    for row in expired:
        same = fenced(row.seq, row.token)
        try:
            with sessions.begin() as s:
                # a holder frozen mid-transaction keeps the row locked (until the server ends its
                # session): skip the job this pass rather than stall every other one behind it
                _bounded_lock_wait(s)
                if row.cancel_requested:  # its worker died before honouring the cancel: it ends here
                    res = s.execute(update(Job).where(same).values(**_cancelled(now)))
                    if res.rowcount == 1:
                        report.cancelled.append(row.id)
                    continue
                if row.attempts >= max_attempts:
                    res = s.execute(update(Job).where(same).values(**_exhausted(row.attempts, max_attempts, now)))
                    if res.rowcount == 1:
                        report.failed.append(row.id)
                    continue
                # A new token fences the lost worker out, should it come back (paused VM, partition).
                res = s.execute(update(Job).where(same).values(
                    status=JobStatus.QUEUED, token=Job.token + 1, lease_expires_at=None, updated_at=now))
                if res.rowcount != 1:
                    continue
        except OperationalError as exc:
            if not _is_lock_timeout(exc):
                raise
            report.locked.append(row.id)
            continue
        if _publish(publisher, row.id):
            report.requeued.append(row.id)
        else:
            report.unpublished.append(row.id)
    for job_id in report.requeued + report.failed:
        log.warning("job %s: lease expired; %s", job_id, "requeued" if job_id in report.requeued else
                    "attempt limit reached, failed")

    with sessions.begin() as s:  # queued with a cancel request (left so by older releases): end them
        stuck = s.execute(update(Job).where(Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(True))
                          .values(**_cancelled(now)).returning(Job.id)).scalars().all()
        report.cancelled.extend(stuck)
    for job_id in report.cancelled:
        log.warning("job %s: cancel requested and its worker is gone; cancelled", job_id)
    report.republished = _republish_lost(sessions, publisher, requeue_queued_after, now, batch)
    return report


def _republish_lost(sessions: "sessionmaker", publisher: Publisher, after: timedelta, now: datetime,
                    batch: int) -> list[str]:
    """Publish again the queued jobs the broker no longer holds a message for."""
    cutoff = now - after
    with sessions() as s:
        stale = s.execute(
            select(Job.seq, Job.id, Job.token)
            .where(Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(False), Job.updated_at < cutoff)
            .order_by(Job.seq).limit(batch)
        ).all()
        if not stale:
            return []
        queued = s.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED))
    try:
        depth = publisher.queue_depth()
    except Exception as exc:  # broker down: nothing to compare with; the next pass tries again
        log.info("reconciler: broker unreachable (%s)", exc)
        return []
    if depth >= (queued or 0):
        return []  # every queued job still has its message (duplicates only make this conservative)
    out = []
    for row in stale:
        with sessions.begin() as s:
            # Touch updated_at so that each pass republishes a job at most once per interval.
            res = s.execute(update(Job).where(fenced(row.seq, row.token, JobStatus.QUEUED), Job.updated_at < cutoff)
                            .values(updated_at=now))
            if res.rowcount != 1:
                continue
        if _publish(publisher, row.id):
            out.append(row.id)
    if out:
        log.warning("reconciler: broker held %d message(s) for %d queued job(s); republished %d", depth, queued,
                    len(out))
    return out


def _publish(publisher: Publisher, job_id: str) -> bool:
    try:
        publisher.enqueue_training(job_id)
        return True
    except Exception as exc:
        log.warning("job %s: could not publish (%s); will retry", job_id, exc)
        return False


class Reconciler:
    """Runs :func:`reconcile` every ``every_s`` seconds in a daemon thread (started by the API)."""

    def __init__(self, sessions: "sessionmaker", publisher: Publisher, *, every_s: float, max_attempts: int,
                 requeue_queued_after_s: float):
        self.sessions, self.publisher, self.every_s = sessions, publisher, every_s
        self.max_attempts = max_attempts
        self.requeue_queued_after = timedelta(seconds=requeue_queued_after_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0

    def run_once(self) -> ReconcileReport:
        return reconcile(self.sessions, self.publisher, max_attempts=self.max_attempts,
                         requeue_queued_after=self.requeue_queued_after)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.run_once()
            except Exception as exc:  # database down: log and try again next interval
                log.warning("reconciler pass failed: %s: %s", type(exc).__name__, exc)
            self.passes += 1

    def start(self) -> "Reconciler":
        self._thread = threading.Thread(target=self._loop, name="odeforge-reconciler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


class LeaseKeeper:
    """The worker's heartbeat: renews the lease of ``(job_seq, token)`` every ``lease / 3`` until stopped or lost.

    When a renewal finds the claim gone (the job was requeued to another worker, cancelled or
    finished), :attr:`lost` is set and the training loop stops at its next step; its writes would be
    refused anyway (:func:`fenced`). A database that is briefly unreachable is retried until the
    lease runs out.
    """

    def __init__(self, sessions: "sessionmaker", job_seq: int, token: int, lease: timedelta):
        self.sessions, self.job_seq, self.token, self.lease = sessions, job_seq, token, lease
        self.lost = threading.Event()  # our claim was superseded (or the job ended elsewhere)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_seq}", daemon=True)

    def _run(self) -> None:
        interval = self.lease.total_seconds() / 3
        while not self._stop.wait(interval):
            try:
                if not renew(self.sessions, self.job_seq, self.token, self.lease):
                    log.warning("job #%d: lease lost (token %d superseded); stopping", self.job_seq, self.token)
                    self.lost.set()
                    return
            except Exception as exc:  # database briefly unreachable: keep trying until the lease runs out
                log.warning("job #%d: lease renewal failed: %s: %s", self.job_seq, type(exc).__name__, exc)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
