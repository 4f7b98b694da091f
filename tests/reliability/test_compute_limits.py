"""Compute bounds while jobs run, with real processes (issue 14): `odeforge worker` subprocesses,
the real Redis broker, the job store (SQLite, and PostgreSQL for the fairness test) and the API
with its reconciler in-process.

1. One worker takes, in order: a warm-up job; a job whose evaluation at eval_rtol 1e-13 would run for
   hours, cancelled mid-evaluation (it ends ``cancelled`` within seconds); a job longer than its
   wall-clock limit (``failed``, JobTimeLimitExceeded, its checkpoints kept); a job whose memory
   outgrows the worker's limit (``failed``, MemoryLimitExceeded); and a small job, which the same
   worker process trains to the end.
2. Two workers, one running job per owner: bob's job runs while alice's second job waits for her
   first; a cancelled job whose worker is frozen and then killed ends ``cancelled``, never ``queued``.
"""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.conftest import wait_for_job
from tests.reliability.conftest import log_text, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.redis]

TINY = {"model": {"type": "cnf", "hidden_dims": [8, 8]}, "dataset": {"name": "moons", "n_samples": 256},
        "solver": {"rtol": 1e-5, "atol": 1e-5},
        "training": {"iterations": 2, "batch_size": 64, "eval_every": 2, "checkpoint_every": 2, "lr": 1e-2}}
# Step 1 checkpointed (so the test sees training is over), step 2 trained, then an evaluation at a
# tolerance float32 steps crawl through (~400 steps per 6 s at t ~ 0.015 of [0, 1]): hours.
SLOW_EVAL = {**TINY, "solver": {"rtol": 1e-5, "atol": 1e-5, "eval_rtol": 1e-13, "eval_atol": 1e-13,
                                "max_num_steps": 1_000_000},
             "training": {**TINY["training"], "checkpoint_every": 1}}
LONG = {**TINY, "training": {**TINY["training"], "iterations": 100_000, "eval_every": 100_000, "checkpoint_every": 5}}
# Backprop through the solver (no adjoint) on 65,536 points: every field evaluation keeps ~100 MB of
# activations, so the first solve passes the limit within a few steps (in-process: +600 MB in ~5 s).
HUNGRY = {"model": {"type": "cnf", "hidden_dims": [64]}, "dataset": {"name": "moons", "n_samples": 82_000},
          "solver": {"rtol": 1e-5, "atol": 1e-5, "adjoint": False},
          "training": {"iterations": 5, "batch_size": 65_536, "eval_every": 5, "checkpoint_every": 5}}
MEMORY_MB = 900
TIME_S = 10


def _checkpoints(client, job_id: str) -> list[str]:
    return [c["name"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"]]


def test_cancel_reaches_a_long_evaluation_and_limits_fail_jobs_not_the_worker(make_settings, start_workers):
    settings = make_settings(cancel_poll_s=0.2, max_job_seconds=TIME_S, max_worker_memory_mb=MEMORY_MB)
    with TestClient(create_app(settings)) as client:
        (worker,) = start_workers(settings, 1)
        ids = [client.post("/v1/jobs", json=spec).json()["id"] for spec in (TINY, SLOW_EVAL, LONG, HUNGRY, TINY)]
        warm, slow, long_, hungry, last = ids
        wait_for_job(client, warm, ("succeeded",), timeout=120)  # imports done: later jobs start at once

        # 1. cancel mid-evaluation: step 1's checkpoint is written, step 2 trained, its evaluation crawls
        wait_until(lambda: "step-000001.safetensors" in _checkpoints(client, slow), 60, "step 1 checkpoint")
        time.sleep(2.0)
        assert client.get(f"/v1/jobs/{slow}").json()["status"] == "running"
        asked = time.monotonic()
        assert client.post(f"/v1/jobs/{slow}/cancel").status_code == 202
        job = wait_for_job(client, slow, ("cancelled",), timeout=30)
        took = time.monotonic() - asked
        assert took < 5.0, took
        history = client.get(f"/v1/jobs/{slow}/metrics").json()["history"]
        assert [r["step"] for r in history] == [1, 2] and "loss" in history[-1]
        assert "test_nll" not in history[-1] and job["error"] is None  # the evaluation never finished
        # the worker's memory now (training `long_`, a tiny job), well below the limit `hungry` will pass
        rss_before = psutil.Process(worker.pid).memory_info().rss / 2**20
        assert rss_before < MEMORY_MB - 200, rss_before

        # 2. the wall-clock limit: failed with the named error, its periodic checkpoints kept
        job = wait_for_job(client, long_, ("failed",), timeout=TIME_S + 60)
        assert job["error"]["type"] == "JobTimeLimitExceeded", job
        assert "ODEFORGE_MAX_JOB_SECONDS" in job["error"]["detail"] and f"{TIME_S} s" in job["error"]["detail"]
        kept = _checkpoints(client, long_)
        assert kept and "final.safetensors" not in kept and job["step"] >= 5

        # 3. the memory limit: the job fails, the worker survives it
        job = wait_for_job(client, hungry, ("failed",), timeout=120)
        assert job["error"]["type"] == "MemoryLimitExceeded", (rss_before, job)
        assert f"{MEMORY_MB} MiB" in job["error"]["detail"] and "ODEFORGE_MAX_WORKER_MEMORY_MB" in job["error"]["detail"]

        # 4. ... and the same process trains the next job
        job = wait_for_job(client, last, ("succeeded",), timeout=120)
        assert job["error"] is None and worker.poll() is None
        assert log_text(worker).count(" ready.") == 1
        assert psutil.Process(worker.pid).memory_info().rss / 2**20 < MEMORY_MB


ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789ab"


@pytest.mark.postgres
def test_one_owner_cannot_hold_every_worker_and_a_cancel_outlives_its_worker(make_settings, pg_url, start_workers):
    settings = make_settings(database_url=pg_url, api_keys=f"alice:{ALICE},bob:{BOB}", max_running_per_owner=1,
                             owner_retry_s=0.5, lease_s=5, reconcile_every_s=0.5, cancel_poll_s=0.2)
    alice, bob = ({"Authorization": f"Bearer {k}"} for k in (ALICE, BOB))
    with TestClient(create_app(settings)) as client:
        workers = start_workers(settings, 2)
        a1 = client.post("/v1/jobs", json=LONG, headers=alice).json()["id"]
        wait_for_job(_as(client, alice), a1, ("running",), timeout=120)
        a2 = client.post("/v1/jobs", json=TINY, headers=alice).json()["id"]
        b1 = client.post("/v1/jobs", json=TINY, headers=bob).json()["id"]

        # bob's job runs on the second worker while alice's second job waits for her first
        wait_for_job(_as(client, bob), b1, ("succeeded",), timeout=120)
        assert client.get(f"/v1/jobs/{a1}", headers=alice).json()["status"] == "running"
        assert client.get(f"/v1/jobs/{a2}", headers=alice).json()["status"] == "queued"
        assert any(f"job {a2}: its owner is at ODEFORGE_MAX_RUNNING_PER_OWNER" in log_text(w) for w in workers)
        assert client.post(f"/v1/jobs/{a1}/cancel", headers=alice).status_code == 202
        wait_for_job(_as(client, alice), a1, ("cancelled",), timeout=30)
        wait_for_job(_as(client, alice), a2, ("succeeded",), timeout=120)  # her slot is free: it runs now

        # a cancel its worker never honours (frozen, then killed) still ends the job cancelled
        c1 = client.post("/v1/jobs", json=LONG, headers=bob).json()["id"]
        wait_for_job(_as(client, bob), c1, ("running",), timeout=120, pred=lambda j: j["step"] >= 1)
        holder = next(w for w in workers if re.search(rf"job {c1}: claimed", log_text(w)))
        os.kill(holder.pid, signal.SIGSTOP)
        assert client.post(f"/v1/jobs/{c1}/cancel", headers=bob).status_code == 202
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        seen = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = client.get(f"/v1/jobs/{c1}", headers=bob).json()["status"]
            seen.add(status)
            if status == "cancelled":
                break
            time.sleep(0.2)
        assert seen <= {"running", "cancelled"} and "cancelled" in seen, seen  # never queued again
        time.sleep(1.5)  # a few more reconciler passes change nothing
        assert client.get(f"/v1/jobs/{c1}", headers=bob).json()["status"] == "cancelled"


class _as:
    """``client`` with ``headers`` on every GET (what ``wait_for_job`` calls)."""

    def __init__(self, client, headers):
        self.client, self.headers = client, headers

    def get(self, url, **kw):
        return self.client.get(url, headers=self.headers, **kw)
