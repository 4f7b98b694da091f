"""Workers that die, freeze or come back, with real processes: `odeforge worker` subprocesses, the
real Redis broker, the real PostgreSQL job store, and the API (with its reconciler) in-process.

One job lives through a frozen worker (SIGSTOP, as in a long GC pause or a network partition), a
takeover by a second worker, the first worker waking up (fenced out by its stale token) and the
second worker being SIGKILLed; it still finishes, with one metrics row per step and the same losses
as an uninterrupted run of the same spec (computed here, in-process, with node_engine). Another job
kills every worker that takes it: it ends ``failed`` at the attempt limit, saying why.
"""

from __future__ import annotations

import math
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from jobs.store import JobStore
from jobs.tables import make_engine, make_sessionmaker
from service.app import create_app
from tests.conftest import wait_for_job
from tests.reliability.conftest import log_text, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]

ITERATIONS = 40
SPEC = {
    "model": {"type": "cnf", "hidden_dims": [8, 8]},
    "dataset": {"name": "moons", "n_samples": 256},
    "solver": {"rtol": 1e-5, "atol": 1e-5},
    "training": {"iterations": ITERATIONS, "batch_size": 64, "eval_every": ITERATIONS, "checkpoint_every": 5,
                 "lr": 1e-2},
}


def _reference_losses(spec: dict) -> list[float]:
    """Losses of the same job trained start to end without interruption."""
    import torch

    from node_engine.training import TrainingCallbacks, build_trainer

    losses: list[float] = []

    class Collect(TrainingCallbacks):
        def on_step(self, record: dict) -> None:
            losses.append(float(record["loss"]))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run with OMP_NUM_THREADS=1: same reduction order
    try:
        build_trainer(spec).run(Collect())
    finally:
        torch.set_num_threads(threads)
    return losses


def _claimed(proc, job_id: str, attempt: int) -> bool:
    return f"job {job_id}: claimed (attempt {attempt}," in log_text(proc)


def test_frozen_then_killed_workers_never_lose_or_double_train_a_job(make_settings, pg_url, start_workers):
    settings = make_settings(database_url=pg_url, lease_s=5, reconcile_every_s=0.5, max_attempts=5)
    with TestClient(create_app(settings)) as client:
        a, b = start_workers(settings, 2)
        job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
        spec = client.get(f"/v1/jobs/{job_id}").json()["spec"]  # with the documented defaults filled in
        # the uninterrupted run, trained here while the workers train (and wait out leases) below
        reference = ThreadPoolExecutor(1).submit(_reference_losses, spec)

        first = wait_until(lambda: next((w for w in (a, b) if _claimed(w, job_id, 1)), None), 60, "first claim")
        second = b if first is a else a
        wait_for_job(client, job_id, ("running",), timeout=120, pred=lambda j: j["step"] >= 7)

        # 1. Freeze the worker. It stops renewing its lease; the reconciler requeues the job under a new
        #    token and the other worker resumes it from the last checkpoint.
        os.kill(first.pid, signal.SIGSTOP)
        frozen_at = client.get(f"/v1/jobs/{job_id}").json()["step"]
        resumed = wait_until(lambda: re.search(rf"job {job_id}: resuming from step-(\d+)\.safetensors",
                                               log_text(second)), 90, "takeover by the second worker")
        assert _claimed(second, job_id, 2)
        assert 5 <= int(resumed.group(1)) <= frozen_at

        # 2. The frozen worker wakes up with a stale token: its writes are refused and it stops.
        os.kill(first.pid, signal.SIGCONT)
        wait_until(lambda: f"job {job_id}: superseded" in log_text(first), 60, "first worker fenced out")
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"

        # 3. Kill the second worker outright. The job goes back to the first one and still finishes.
        wait_for_job(client, job_id, ("running",), timeout=120, pred=lambda j: j["step"] >= int(resumed.group(1)) + 6)
        os.kill(second.pid, signal.SIGKILL)
        second.wait()
        killed_at = client.get(f"/v1/jobs/{job_id}").json()["step"]
        assert killed_at < ITERATIONS
        job = wait_for_job(client, job_id, ("succeeded",), timeout=180)
        assert _claimed(first, job_id, 3)
        again = re.search(rf"job {job_id}: resuming from step-(\d+)\.safetensors", log_text(first))
        assert again is not None, log_text(first)
        # The last checkpoint the killed worker wrote (the step in the job row lags at most a flush).
        assert int(again.group(1)) % 5 == 0 and killed_at - 10 < int(again.group(1)) <= killed_at

        assert job["step"] == job["total_steps"] == ITERATIONS and job["error"] is None
        history = client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["history"]
        assert [r["step"] for r in history] == list(range(1, ITERATIONS + 1))  # no gap, no duplicate
        assert all(math.isfinite(r["loss"]) and r["nfe_forward"] > 0 for r in history)
        assert math.isfinite(job["metrics"]["test_nll"])
        names = [c["name"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"]]
        assert "final.safetensors" in names

    engine = make_engine(pg_url)
    row = JobStore(make_sessionmaker(engine)).get_job(job_id)
    engine.dispose()
    assert row.attempts == 3 and row.lease_expires_at is None

    # Three workers trained pieces of it; the result is the uninterrupted trajectory.
    np.testing.assert_allclose([r["loss"] for r in history], reference.result(300), rtol=1e-4)


def test_a_job_that_keeps_killing_its_workers_fails_at_the_attempt_limit(make_settings, start_workers):
    settings = make_settings(lease_s=5, reconcile_every_s=0.5, max_attempts=2)  # SQLite job store
    spec = {**SPEC, "training": {**SPEC["training"], "iterations": 1000}}
    with TestClient(create_app(settings)) as client:
        workers = start_workers(settings, 2)
        job_id = client.post("/v1/jobs", json=spec).json()["id"]
        for attempt in (1, 2):  # each worker that takes the job dies (as if the job crashed it: OOM, segfault)
            holder = wait_until(lambda: next((w for w in workers if _claimed(w, job_id, attempt)), None), 90,
                                f"attempt {attempt}")
            wait_for_job(client, job_id, ("running",), timeout=120, pred=lambda j: j["step"] >= 1)
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()
        job = wait_for_job(client, job_id, ("failed",), timeout=60)
        assert job["error"]["type"] == "JobAttemptsExhausted", job
        assert "2 attempts" in job["error"]["detail"] and "ODEFORGE_MAX_ATTEMPTS=2" in job["error"]["detail"]
        assert job["finished_at"] is not None and job["step"] < 1000
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 409  # final: nothing loops any more
