"""The per-owner running limit of the claim and cancel requests whose worker died, on the real
SQLite and PostgreSQL job stores (and the real Redis broker for the reconciler's messages); the
worker's side of the store is driven directly, time is moved in the rows, not slept."""

from __future__ import annotations

import json
import threading
from base64 import b64decode
from datetime import timedelta

import pytest
from sqlalchemy import update

from jobs.leases import reconcile
from jobs.queue import Broker
from jobs.store import JobStore
from jobs.tables import Job, init_db, make_engine, make_sessionmaker, utcnow

pytestmark = pytest.mark.redis

SPEC = {"model": {"type": "cnf"}, "dataset": {"name": "moons"}}
LATER = timedelta(hours=1)


@pytest.fixture
def env(make_settings, database_url):
    settings = make_settings(database_url=database_url, lease_s=30, max_attempts=3)
    engine = make_engine(settings.database_url)
    init_db(engine)
    store = JobStore(make_sessionmaker(engine), lease_s=30, max_attempts=3, max_running_per_owner=1)
    broker = Broker(settings)
    yield store, broker
    broker.close()
    engine.dispose()


def messages(redis_client, queue: str) -> list[str]:
    return [json.loads(b64decode(json.loads(raw)["body"]))[0][0] for raw in redis_client.lrange(queue, 0, -1)]


def expire(store: JobStore, job_id: str) -> None:
    with store.sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def submit(store: JobStore, owner: str | None) -> str:
    return store.create_job(SPEC, owner=owner)[0].id


def test_an_owner_at_its_limit_waits_in_order_while_another_owner_runs(env):
    store, _ = env
    a1, a2, a3 = (submit(store, "alice") for _ in range(3))
    b1 = submit(store, "bob")
    row, token = store.claim(a1)
    # alice holds her one slot: her next job stays queued, untouched (no attempt counted)
    assert store.claim(a2) is None and store.last_claim_reason == "owner-limit"
    assert store.get_job(a2).status == "queued" and store.get_job(a2).attempts == 0
    assert store.claim(b1) is not None  # bob is not held up by alice
    assert store.finish(row, token, "succeeded")
    # alice's slot is free: her jobs start in submission order (a3's message may come first)
    assert store.claim(a3) is None and store.last_claim_reason == "owner-limit"
    assert store.claim(a2) is not None
    assert store.claim(a3) is None and store.last_claim_reason == "owner-limit"


def test_no_owner_and_dead_holders_do_not_count(env):
    store, _ = env
    anonymous = [submit(store, None) for _ in range(3)]  # authentication off: one tenant, no limit
    assert all(store.claim(j) is not None for j in anonymous)
    c1, c2 = submit(store, "carol"), submit(store, "carol")
    assert store.claim(c1) is not None
    expire(store, c1)  # c1's worker died: it holds no slot (the reconciler will requeue it)
    assert store.claim(c2) is not None
    assert store.claim(c1) is None and store.last_claim_reason == "owner-limit"  # its redelivery waits now


def test_concurrent_claims_of_one_owner_respect_the_limit(env):
    """Two jobs of one owner that may each start alone (a redelivered job whose worker died, and a
    newer queued one), claimed at the same moment: one wins (PostgreSQL serializes the owner's
    claims with an advisory lock; SQLite has one writer)."""
    store, _ = env
    for round_ in range(6):
        owner = f"erin-{round_}"
        dead, queued = submit(store, owner), submit(store, owner)
        store.claim(dead)
        expire(store, dead)
        barrier = threading.Barrier(2)
        results: list = []

        def grab(job_id: str) -> None:
            barrier.wait()
            results.append(store.claim(job_id))

        threads = [threading.Thread(target=grab, args=(j,)) for j in (dead, queued)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(r is not None for r in results) == 1, results
        assert sum(store.get_job(j).status == "running" and store.get_job(j).lease_expires_at > utcnow()
                   for j in (dead, queued)) == 1


def test_a_cancelled_job_whose_worker_died_ends_cancelled(env, redis_client, queue_name):
    store, broker = env
    job = submit(store, "alice")
    store.claim(job)
    assert store.request_cancel(job).job.cancel_requested  # running: the worker should stop it ...
    expire(store, job)  # ... but it died first
    report = reconcile(store.sessions, broker, max_attempts=3, requeue_queued_after=LATER)
    assert report.cancelled == [job] and report.requeued == []
    row = store.get_job(job)
    assert row.status == "cancelled" and row.finished_at is not None and row.lease_expires_at is None
    assert messages(redis_client, queue_name) == []  # nothing left to run


def test_cancel_requests_left_queued_by_older_releases_end_cancelled(env, redis_client, queue_name):
    store, broker = env
    stuck, redelivered = submit(store, None), submit(store, None)
    with store.sessions.begin() as s:  # what the old reconciler left: queued with a cancel request
        s.execute(update(Job).where(Job.id.in_([stuck, redelivered])).values(cancel_requested=True))
    assert store.claim(redelivered) is None and store.last_claim_reason == "cancelled"
    assert store.get_job(redelivered).status == "cancelled"
    report = reconcile(store.sessions, broker, max_attempts=3, requeue_queued_after=LATER)
    assert report.cancelled == [stuck]
    assert store.get_job(stuck).status == "cancelled"
    assert messages(redis_client, queue_name) == []
