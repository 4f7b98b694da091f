"""The broker goes away and comes back, with real processes: a private `redis-server` (killed and
restarted by this test, without persistence, so its queue is lost like a crashed broker's), a real
`odeforge worker` subprocess and the API in-process with its reconciler.

Choice documented in the README: while the broker is down, ``POST /v1/jobs`` answers 503
problem+json with ``Retry-After`` and keeps nothing (the client retries, with an ``Idempotency-Key``
to be safe); it never answers 500 and never leaves a job ``queued`` with no message. A job queued
*before* the broker lost its data is republished by the reconciler once the broker is back.
"""

from __future__ import annotations

import math
import time

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.conftest import wait_for_job
from tests.reliability.conftest import log_text

pytestmark = [pytest.mark.slow]

TINY = {
    "model": {"type": "cnf", "hidden_dims": [8, 8]},
    "dataset": {"name": "moons", "n_samples": 256},
    "training": {"iterations": 3, "batch_size": 64, "eval_every": 3, "checkpoint_every": 3, "lr": 1e-2},
}
# An atol that is 0 in float32 (an rtol that small is refused at submission): the error ratio is not
# finite, and the first solve fails with a named SolverError.
BLOWS_UP = {**TINY, "solver": {"rtol": 1e-5, "atol": 1e-300, "max_num_steps": 1_000_000}}


def assert_problem(resp, status: int, slug: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["type"].endswith("/" + slug) and body["detail"]
    return body


def assert_broker_down(client, n_jobs: int) -> None:
    resp = client.post("/v1/jobs", json=TINY)
    assert_problem(resp, 503, "broker-unavailable")
    assert int(resp.headers["retry-after"]) > 0
    assert len(client.get("/v1/jobs").json()["jobs"]) == n_jobs  # the refused submission left nothing
    ready = client.get("/readyz")
    body = assert_problem(ready, 503, "not-ready")
    assert [e["field"] for e in body["errors"]] == ["broker"]
    assert client.get("/healthz").status_code == 200


def test_broker_down_answers_503_and_work_resumes_when_it_returns(make_settings, private_redis, start_workers):
    settings = make_settings(broker_url=private_redis.url, broker_timeout_s=1.0, reconcile_every_s=0.5,
                             requeue_queued_after_s=1.0)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json() == {"database": "ok", "broker": "ok"}
        queued = client.post("/v1/jobs", json=TINY).json()["id"]  # no worker yet: waits in the queue

        private_redis.kill()  # the broker crashes and loses its queue
        assert_broker_down(client, n_jobs=1)
        private_redis.start()
        assert client.get("/readyz").status_code == 200

        worker = start_workers(settings, 1)[0]
        # The message was lost with the broker; the reconciler publishes it again.
        job = wait_for_job(client, queued, ("succeeded",), timeout=120)
        assert job["step"] == 3 and math.isfinite(job["metrics"]["test_nll"])

        # The broker goes down under an idle worker and comes back: the same worker process consumes again.
        private_redis.kill()
        assert_broker_down(client, n_jobs=1)
        time.sleep(1.0)
        private_redis.start()
        bad = client.post("/v1/jobs", json=BLOWS_UP)
        assert bad.status_code == 202, bad.text
        good = client.post("/v1/jobs", json=TINY).json()["id"]
        failed = wait_for_job(client, bad.json()["id"], ("failed",), timeout=120)
        assert failed["error"]["type"] in ("NonFiniteStateError", "StepSizeUnderflowError"), failed["error"]
        assert failed["error"]["detail"]
        done = wait_for_job(client, good, ("succeeded",), timeout=120)  # the worker went on to the next job
        assert done["error"] is None
        assert worker.poll() is None and "Connection to broker lost" in log_text(worker)
        assert log_text(worker).count(" ready.") == 1  # never restarted
