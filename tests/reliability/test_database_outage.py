"""The job store's database goes away and comes back (a PostgreSQL database of this test only:
closed to connections, its sessions terminated, then reopened).

API: every route that needs the database answers 503 problem+json with ``Retry-After`` (never 500)
while it is down, ``/readyz`` says so, ``/healthz`` does not care, a refused submission publishes
nothing, and requests succeed again once it is back, without a restart.
Worker: a job that loses its database mid-training is not marked failed (nothing can be written); the
lease runs out, the API's reconciler requeues it, and the next delivery resumes it from its checkpoint.
The worker code runs in-process here (``run_job``, what the Celery task calls).
"""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from jobs.artifacts import LocalArtifactStore
from jobs.store import JobStore
from jobs.tables import make_engine, make_sessionmaker
from service.app import create_app
from tests.conftest import wait_for_job
from tests.reliability.conftest import wait_until
from tests.reliability.test_leases import messages
from worker.runner import WorkerContext, run_job

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]

TINY = {
    "model": {"type": "cnf", "hidden_dims": [8, 8]},
    "dataset": {"name": "moons", "n_samples": 256},
    "training": {"iterations": 3, "batch_size": 64, "eval_every": 3, "checkpoint_every": 3, "lr": 1e-2},
}


def assert_unavailable(resp) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["type"].endswith("/database-unavailable") and body["status"] == 503 and body["detail"]
    assert int(resp.headers["retry-after"]) > 0


def test_api_fails_cleanly_while_the_database_is_down_and_recovers(make_settings, private_database, redis_client,
                                                                   queue_name):
    settings = make_settings(database_url=private_database.url)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        job_id = client.post("/v1/jobs", json=TINY).json()["id"]
        assert messages(redis_client, queue_name) == [job_id]

        private_database.go_down()
        assert_unavailable(client.get(f"/v1/jobs/{job_id}"))
        assert_unavailable(client.get("/v1/jobs"))
        assert_unavailable(client.get(f"/v1/jobs/{job_id}/metrics"))
        assert_unavailable(client.post(f"/v1/jobs/{job_id}/cancel"))
        assert_unavailable(client.post("/v1/jobs", json=TINY))
        assert messages(redis_client, queue_name) == [job_id]  # nothing was published for the refused job
        ready = client.get("/readyz")
        assert ready.status_code == 503 and [e["field"] for e in ready.json()["errors"]] == ["database"]
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200

        private_database.come_back()
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        assert client.post("/v1/jobs", json=TINY).status_code == 202
        assert len(client.get("/v1/jobs").json()["jobs"]) == 2
        assert client.get("/readyz").status_code == 200


def test_a_job_that_loses_its_database_mid_training_is_requeued_and_resumes(make_settings, private_database,
                                                                            redis_client, queue_name):
    settings = make_settings(database_url=private_database.url, lease_s=5, reconcile_every_s=0.5)
    spec = {**TINY, "training": {**TINY["training"], "iterations": 30, "eval_every": 30, "checkpoint_every": 4}}
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        job_id = client.post("/v1/jobs", json=spec).json()["id"]
        redis_client.delete(queue_name)  # this test delivers the messages itself (run_job below)
        engine = make_engine(settings.database_url)
        ctx = WorkerContext(settings, JobStore(make_sessionmaker(engine), lease_s=5, max_attempts=3),
                            LocalArtifactStore(settings.artifact_dir))
        result: list[str] = []
        worker = threading.Thread(target=lambda: result.append(run_job(job_id, ctx)))
        worker.start()
        wait_for_job(client, job_id, ("running",), timeout=120, pred=lambda j: j["step"] >= 6)

        private_database.go_down()
        worker.join(60)
        assert result == ["store-unavailable"]  # stopped without recording a bogus failure
        time.sleep(0.5)
        private_database.come_back()

        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "running" and job["error"] is None
        # Lease expiry -> the API's reconciler requeues the job and publishes a new message.
        wait_until(lambda: messages(redis_client, queue_name) == [job_id], 30, "requeued message")
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        assert run_job(job_id, ctx) == "succeeded"
        engine.dispose()

        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded" and job["step"] == 30
        steps = [r["step"] for r in client.get(f"/v1/jobs/{job_id}/metrics").json()["history"]]
        assert steps == list(range(1, 31))
