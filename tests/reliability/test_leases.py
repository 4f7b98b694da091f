"""Leases, fencing tokens, the attempt limit and the reconciler, on the real SQLite and PostgreSQL
job stores and the real Redis broker (the worker's side of the store, driven directly).

Time is not slept away: the reconciler takes ``now`` and the lease expiry is read from the rows.
"""

from __future__ import annotations

import json
import threading
from base64 import b64decode
from datetime import timedelta

import pytest
from sqlalchemy import update

from jobs.leases import ATTEMPTS_EXHAUSTED, reconcile, renew
from jobs.queue import Broker
from jobs.store import JobStore
from jobs.tables import Job, init_db, make_engine, make_sessionmaker, utcnow

pytestmark = pytest.mark.redis

SPEC = {"model": {"type": "cnf"}, "dataset": {"name": "moons"}}


@pytest.fixture
def env(make_settings, database_url):
    settings = make_settings(database_url=database_url, lease_s=30, max_attempts=2)
    engine = make_engine(settings.database_url)
    init_db(engine)
    store = JobStore(make_sessionmaker(engine), lease_s=settings.lease_s, max_attempts=settings.max_attempts)
    broker = Broker(settings)
    yield settings, store, broker
    broker.close()
    engine.dispose()


def messages(redis_client, queue: str) -> list[str]:
    """Job ids of the messages waiting in the Redis queue, read from the broker itself."""
    return [json.loads(b64decode(json.loads(raw)["body"]))[0][0] for raw in redis_client.lrange(queue, 0, -1)]


def expire(store: JobStore, job_id: str) -> None:
    """The holder stopped renewing: its lease ran out (moved into the past, not slept through)."""
    with store.sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def test_a_live_lease_blocks_a_second_worker_and_renewal_is_fenced(env):
    settings, store, _ = env
    job, _ = store.create_job(SPEC)
    row, token = store.claim(job.id)
    before = store.get_job(job.id).lease_expires_at
    assert before - utcnow() == pytest.approx(timedelta(seconds=30), abs=timedelta(seconds=5))
    assert store.claim(job.id) is None and store.last_claim_reason == "leased"  # duplicate delivery: skipped
    assert renew(store.sessions, row.seq, token, timedelta(seconds=60))
    assert store.get_job(job.id).lease_expires_at > before + timedelta(seconds=20)

    expire(store, job.id)
    row2, token2 = store.claim(job.id)  # the lease ran out: another worker may take it over
    assert token2 == token + 1
    # The first worker comes back: every one of its writes is refused, the new holder's go through.
    assert not renew(store.sessions, row.seq, token, timedelta(seconds=60))
    assert not store.record(row, token, [{"step": 1, "loss": 5.0}], step=1, total_steps=2, latest={"loss": 5.0})
    assert not store.finish(row, token, "succeeded")
    assert not store.release(row, token)
    assert store.record(row2, token2, [{"step": 1, "loss": 1.0}], step=1, total_steps=2, latest={"loss": 1.0})
    assert store.metrics_history(row2, after_step=-1, limit=10)[0] == [{"step": 1, "loss": 1.0}]
    assert store.finish(row2, token2, "succeeded")
    job = store.get_job(job.id)
    assert job.status == "succeeded" and job.attempts == 2 and job.lease_expires_at is None


def test_concurrent_claims_have_exactly_one_winner(env):
    _, store, _ = env
    for _ in range(5):
        job, _ = store.create_job(SPEC)
        results: list = []
        barrier = threading.Barrier(4)

        def grab() -> None:
            barrier.wait()
            results.append(store.claim(job.id))

        threads = [threading.Thread(target=grab) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results if r is not None]
        assert len(winners) == 1, results
        assert store.get_job(job.id).token == winners[0][1] and store.get_job(job.id).attempts == 1


def test_reconciler_requeues_an_expired_lease_once_then_fails_the_poison_job(env, redis_client, queue_name):
    settings, store, publisher = env
    job, _ = store.create_job(SPEC)
    _, t1 = store.claim(job.id)  # attempt 1; the worker dies (no renewal)
    now = utcnow()
    assert reconcile(store.sessions, publisher, max_attempts=2, requeue_queued_after=timedelta(hours=1),
                     now=now).requeued == []  # lease still valid
    later = now + timedelta(seconds=31)
    # Two API replicas reconcile at the same moment: one requeue, one message.
    reports = [reconcile(store.sessions, publisher, max_attempts=2, requeue_queued_after=timedelta(hours=1), now=later)
               for _ in range(2)]
    assert [r.requeued for r in reports] == [[job.id], []]
    assert messages(redis_client, queue_name) == [job.id]
    row = store.get_job(job.id)
    assert row.status == "queued" and row.token == t1 + 1 and row.lease_expires_at is None

    redis_client.delete(queue_name)
    _, t2 = store.claim(job.id)  # attempt 2; that worker dies too
    report = reconcile(store.sessions, publisher, max_attempts=2, requeue_queued_after=timedelta(hours=1),
                       now=utcnow() + timedelta(seconds=31))
    assert report.failed == [job.id] and report.requeued == []
    assert messages(redis_client, queue_name) == []
    row = store.get_job(job.id)
    assert row.status == "failed" and row.error_type == ATTEMPTS_EXHAUSTED and row.finished_at is not None
    assert "2 attempts" in row.error_detail and "ODEFORGE_MAX_ATTEMPTS" in row.error_detail
    assert not store.record(row, t2, [{"step": 1}], step=1, total_steps=2, latest={})  # the dead worker is fenced


def test_a_redelivered_message_at_the_attempt_limit_fails_the_job(env):
    _, store, _ = env
    job, _ = store.create_job(SPEC)
    store.claim(job.id)
    expire(store, job.id)
    assert store.claim(job.id) is not None  # redelivered after the lease ran out: attempt 2
    expire(store, job.id)
    assert store.claim(job.id) is None and store.last_claim_reason == "exhausted"
    row = store.get_job(job.id)
    assert row.status == "failed" and row.error_type == ATTEMPTS_EXHAUSTED


def test_graceful_release_does_not_count_as_an_attempt(env):
    _, store, _ = env
    job, _ = store.create_job(SPEC)
    for _ in range(5):  # moved between workers five times by SIGTERMs: never a poison job
        row, token = store.claim(job.id)
        assert store.release(row, token)
    row = store.get_job(job.id)
    assert row.status == "queued" and row.attempts == 0 and row.token == 10


def test_queued_jobs_whose_messages_the_broker_lost_are_republished(env, redis_client, queue_name):
    settings, store, publisher = env
    a, _ = store.create_job(SPEC)
    b, _ = store.create_job(SPEC)
    publisher.enqueue_training(a.id)
    publisher.enqueue_training(b.id)
    after = timedelta(seconds=60)
    future = utcnow() + timedelta(seconds=61)
    # Both messages are in the broker: nothing to do, however old the jobs are.
    assert reconcile(store.sessions, publisher, max_attempts=2, requeue_queued_after=after, now=future).republished == []
    redis_client.delete(queue_name)  # the broker restarted without persistence
    assert publisher.queue_depth() == 0
    # Young queued jobs are left alone (their messages may still be in flight) ...
    assert reconcile(store.sessions, publisher, max_attempts=2, requeue_queued_after=after).republished == []
    # ... old ones are published again, once.
    report = reconcile(store.sessions, publisher, max_attempts=2, requeue_queued_after=after, now=future)
    assert sorted(report.republished) == sorted([a.id, b.id])
    assert sorted(messages(redis_client, queue_name)) == sorted([a.id, b.id])
    again = reconcile(store.sessions, publisher, max_attempts=2, requeue_queued_after=after, now=future)
    assert again.republished == []


def test_a_frozen_workers_open_transaction_is_ended_so_its_row_lock_frees(pg_url):
    """A worker frozen between an UPDATE and its COMMIT holds the row lock; with the workers'
    engine setting (idle_in_transaction_timeout_s = lease) PostgreSQL ends that session and the
    lock frees, so the reconciler's requeue of the job does not wait on it. Control: without the
    setting the same lock is still held after the same wait."""
    import time

    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    other = make_engine(pg_url)
    with other.begin() as c:
        c.execute(text("CREATE TABLE lock_probe (id int PRIMARY KEY, v int)"))
        c.execute(text("INSERT INTO lock_probe VALUES (1, 0)"))

    def lock_then_idle(engine) -> object:
        conn = engine.connect()
        conn.begin()
        conn.execute(text("UPDATE lock_probe SET v = 1 WHERE id = 1"))  # row lock held, then "frozen"
        return conn

    def can_update_within(seconds: float) -> bool:
        with other.begin() as c:
            c.execute(text(f"SET LOCAL lock_timeout = '{int(seconds * 1000)}ms'"))
            try:
                c.execute(text("UPDATE lock_probe SET v = 2 WHERE id = 1"))
                return True
            except DBAPIError:
                return False

    plain = make_engine(pg_url)
    held = lock_then_idle(plain)
    time.sleep(1.5)
    assert not can_update_within(1.0)  # control: an idle transaction keeps its lock
    held.close()
    plain.dispose()

    worker_like = make_engine(pg_url, idle_in_transaction_timeout_s=1.0)
    held = lock_then_idle(worker_like)
    time.sleep(1.5)
    assert can_update_within(1.0)  # the server ended the frozen session: the lock is free
    with pytest.raises(DBAPIError):
        held.execute(text("SELECT 1"))  # and the frozen worker's session is gone (its work fenced)
    held.close()
    worker_like.dispose()
    other.dispose()


def test_the_reconciler_skips_a_locked_row_and_requeues_it_once_free(make_settings, pg_url):
    """One expired job whose row a stuck holder keeps locked must not stall the pass: the other
    expired job is requeued at once, the locked one on the first pass after the lock is gone."""
    import time

    from jobs.leases import LOCK_WAIT_S

    settings = make_settings(database_url=pg_url, lease_s=30, max_attempts=3)
    engine = make_engine(pg_url)
    init_db(engine)
    store = JobStore(make_sessionmaker(engine), lease_s=30, max_attempts=3)
    publisher = Broker(settings)
    holder = make_engine(pg_url)
    try:
        stuck, _ = store.create_job(SPEC)
        free, _ = store.create_job(SPEC)
        for job in (stuck, free):
            store.claim(job.id)
            expire(store, job.id)
        conn = holder.connect()
        conn.begin()
        conn.execute(update(Job).where(Job.id == stuck.id).values(updated_at=utcnow()))  # lock held, not committed

        start = time.monotonic()
        report = reconcile(store.sessions, publisher, max_attempts=3, requeue_queued_after=timedelta(hours=1))
        assert time.monotonic() - start < LOCK_WAIT_S + 5
        assert report.locked == [stuck.id] and report.requeued == [free.id]
        assert store.get_job(stuck.id).status == "running"

        conn.rollback()
        conn.close()
        report = reconcile(store.sessions, publisher, max_attempts=3, requeue_queued_after=timedelta(hours=1))
        assert report.requeued == [stuck.id] and report.locked == []
        assert store.get_job(stuck.id).status == "queued"
    finally:
        holder.dispose()
        publisher.close()
        engine.dispose()
