"""End to end with real processes: the API (in-process), a real Celery worker subprocess
(`odeforge worker`), the real Redis broker, and the real PostgreSQL job store (SQLite, shared by two
worker processes, in the SIGTERM test). The tests that need one worker nothing kills share one.

Right values come from outside the code under test: a trained CNF is a normalized density, so
exp(log p) integrates to 1 over the plane (trapezoid rule on a grid); its samples' mean must match
the mean of that density computed by the same quadrature (sampling and log-density are different
ODE solves); bits/dim = NLL / (D ln 2); checkpoints are read back with the safetensors library.
"""

from __future__ import annotations

import io
import math
import uuid
from typing import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.conftest import RUN_ID, kill_worker, pg_schema, spawn_worker, wait_for_job

pytestmark = [pytest.mark.slow, pytest.mark.redis]

TINY_CNF = {
    "model": {"type": "cnf", "hidden_dims": [8, 8]},
    "dataset": {"name": "moons", "n_samples": 256},
    "solver": {"rtol": 1e-5, "atol": 1e-5},
    "training": {"iterations": 5, "batch_size": 64, "eval_every": 5, "checkpoint_every": 2, "lr": 1e-2},
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, postgres_dsn, redis_url, redis_client) -> Iterator[tuple]:
    """``(settings, worker)``: one PostgreSQL job store, queue and `odeforge worker` process for the tests
    below that need one worker which nothing kills (a worker start is most of such a test's time).
    Each test still runs its own API app; their jobs are trained one after another by this worker."""
    from jobs.settings import Settings

    data = tmp_path_factory.mktemp("e2e")
    queue = f"odeforge-test-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    with pg_schema(postgres_dsn) as url:
        settings = Settings(database_url=url, broker_url=redis_url, queue=queue, artifact_dir=data / "artifacts",
                            device="cpu", broker_timeout_s=2.0, cancel_poll_s=0.05, ready_requires_worker=False)
        with TestClient(create_app(settings)):
            pass  # creates the job store's tables before the worker reads them
        worker = spawn_worker(settings, data / "worker.log")
        try:
            yield settings, worker
        finally:
            kill_worker(worker)
            redis_client.delete(queue, f"_kombu.binding.{queue}")


def _grid(samples: np.ndarray, n: int = 121) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean, std = samples.mean(0), samples.std(0)
    xs = np.linspace(mean[0] - 8 * std[0], mean[0] + 8 * std[0], n)
    ys = np.linspace(mean[1] - 8 * std[1], mean[1] + 8 * std[1], n)
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    return xs, ys, np.stack([gx.ravel(), gy.ravel()], axis=1)


def _log_density(client, job_id: str, points: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(points), 5000):
        resp = client.post(f"/v1/jobs/{job_id}/log-density", json={"points": points[start:start + 5000].tolist()})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["nfe"] > 0 and body["checkpoint"] == "final.safetensors"
        out += [-math.inf if v is None else v for v in body["log_density"]]
    return np.asarray(out)


@pytest.mark.postgres
def test_cnf_trains_on_a_real_worker_then_answers_queries_and_a_failing_solve_is_recorded(shared):
    settings, worker = shared
    with TestClient(create_app(settings)) as client:
        # A solve that cannot finish in 1 step fails with the solver's named error ...
        bad_spec = {**TINY_CNF, "solver": {"rtol": 1e-5, "atol": 1e-5, "max_num_steps": 1}}
        bad = client.post("/v1/jobs", json=bad_spec).json()["id"]
        good = client.post("/v1/jobs", json=TINY_CNF).json()["id"]
        classifier = client.post("/v1/jobs", json={
            "model": {"type": "mlp", "hidden": 16}, "dataset": {"name": "digits", "n_samples": 300},
            "training": {"iterations": 3, "batch_size": 32, "eval_every": 3, "checkpoint_every": 3}}).json()["id"]

        failed = wait_for_job(client, bad, ("failed",), timeout=120)
        assert failed["error"]["type"] == "MaxNumStepsError", failed
        assert failed["error"]["detail"] and failed["finished_at"] is not None
        # ... and the worker goes on to the next job.
        job = wait_for_job(client, good, ("succeeded",), timeout=180)
        assert worker.poll() is None

        assert job["progress"] == 1.0 and job["step"] == job["total_steps"] == 5
        assert job["started_at"] <= job["finished_at"]
        m = job["metrics"]
        assert m["num_parameters"] > 0 and math.isfinite(m["test_nll"])
        assert m["test_bits_per_dim"] == pytest.approx(m["test_nll"] / (2 * math.log(2)), rel=1e-9)

        history = client.get(f"/v1/jobs/{good}/metrics").json()["history"]
        assert [r["step"] for r in history] == [1, 2, 3, 4, 5]
        assert all(r["nfe_forward"] > 0 and r["nfe_backward"] > 0 and math.isfinite(r["loss"]) for r in history)
        assert "test_nll" in history[-1] and "test_nll" not in history[0]
        assert client.get(f"/v1/jobs/{good}/metrics", params={"since_step": 3}).json()["history"] == history[3:]

        names = [c["name"] for c in client.get(f"/v1/jobs/{good}/checkpoints").json()["checkpoints"]]
        assert names == ["final.safetensors", "step-000002.safetensors", "step-000004.safetensors"]
        # The Celery worker wrote the job's event log: the stream of the finished job replays it and ends.
        import json

        raw = client.get(f"/v1/jobs/{good}/events").text
        events = [dict(line.split(": ", 1) for line in block.split("\n")) for block in raw.strip().split("\n\n")
                  if block.startswith("id:")]
        kinds = [e["event"] for e in events]
        assert [json.loads(e["data"])["step"] for e in events if e["event"] == "metric"] == [1, 2, 3, 4, 5]
        assert sorted(json.loads(e["data"])["name"] for e in events if e["event"] == "checkpoint") == names
        assert kinds[:2] == ["status", "status"] and kinds[-2:] == ["result", "status"]
        assert json.loads(events[-1]["data"]) == {"status": "succeeded"}
        from safetensors.numpy import load

        tensors = load(client.get(f"/v1/jobs/{good}/checkpoints/final.safetensors").content)
        assert tensors and all(np.isfinite(t).all() for t in tensors.values())

        samples = np.asarray(client.post(f"/v1/jobs/{good}/samples", json={"n": 2000, "seed": 1}).json()["samples"])
        assert samples.shape == (2000, 2) and np.isfinite(samples).all()
        again = client.post(f"/v1/jobs/{good}/samples", json={"n": 2000, "seed": 1}).json()["samples"]
        assert np.array_equal(samples, np.asarray(again))

        xs, ys, grid = _grid(samples)
        density = np.exp(_log_density(client, good, grid)).reshape(len(xs), len(ys))
        total = np.trapezoid(np.trapezoid(density, ys, axis=1), xs)
        assert total == pytest.approx(1.0, abs=0.02)
        mean = [np.trapezoid(np.trapezoid(density * w, ys, axis=1), xs) / total
                for w in (grid[:, 0].reshape(density.shape), grid[:, 1].reshape(density.shape))]
        stderr = samples.std(0) / math.sqrt(len(samples))
        np.testing.assert_array_less(np.abs(samples.mean(0) - mean), 5 * stderr)

        bad_dim = client.post(f"/v1/jobs/{good}/log-density", json={"points": [[0.0, 0.0, 0.0]]})
        assert bad_dim.status_code == 422 and bad_dim.json()["errors"][0]["field"] == "points[0]"
        assert client.post(f"/v1/jobs/{good}/predict", json={"inputs": [[[0.0]]]}).status_code == 409

        # Every query above used one checkpoint, loaded once into the API's cache.
        cache = client.app.state.services.models
        assert cache.misses == 1 and cache.hits >= 4 and len(cache) == 1

        # A classifier answers `predict` with a probability row per image (sklearn's digits, 8 x 8).
        from sklearn.datasets import load_digits

        wait_for_job(client, classifier, ("succeeded",), timeout=120)
        images = load_digits().images[:5]
        for inputs in (images, images[:, None]):  # N x H x W and N x C x H x W
            resp = client.post(f"/v1/jobs/{classifier}/predict", json={"inputs": inputs.tolist()})
            assert resp.status_code == 200, resp.text
            probs = np.asarray(resp.json()["probabilities"])
            assert probs.shape == (5, 10) and (probs >= 0).all()
            np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        wrong = client.post(f"/v1/jobs/{classifier}/predict", json={"inputs": np.zeros((2, 7, 7)).tolist()})
        assert wrong.status_code == 422 and wrong.json()["errors"][0]["field"] == "inputs"
        assert client.post(f"/v1/jobs/{classifier}/log-density", json={"points": [[0.0, 0.0]]}).status_code == 409

        import matplotlib.image

        for name in ("training", "density", "samples"):
            resp = client.get(f"/v1/jobs/{good}/plots/{name}.png")
            assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
            image = matplotlib.image.imread(io.BytesIO(resp.content), format="png")
            assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0.01


@pytest.mark.postgres
def test_cancel_a_running_and_a_queued_job(shared):
    settings, _ = shared
    with TestClient(create_app(settings)) as client:
        long_spec = {**TINY_CNF, "training": {**TINY_CNF["training"], "iterations": 100_000, "eval_every": 100_000,
                                              "checkpoint_every": 3}}
        running = client.post("/v1/jobs", json=long_spec).json()["id"]
        wait_for_job(client, running, ("running",), timeout=120, pred=lambda j: j["step"] >= 4)
        queued = client.post("/v1/jobs", json=TINY_CNF).json()["id"]

        resp = client.post(f"/v1/jobs/{queued}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
        resp = client.post(f"/v1/jobs/{running}/cancel")
        assert resp.status_code == 202

        job = wait_for_job(client, running, ("cancelled",), timeout=60)
        assert 4 <= job["step"] < 100 and job["error"] is None and job["finished_at"] is not None
        steps = [r["step"] for r in client.get(f"/v1/jobs/{running}/metrics", params={"limit": 10_000}).json()["history"]]
        assert steps == list(range(1, job["step"] + 1))
        assert client.get(f"/v1/jobs/{running}/checkpoints").json()["checkpoints"]

        # The cancelled queued job is never started by the worker that later receives it; the next
        # job (on an uploaded 3-D data set) runs.
        buf = io.BytesIO()
        np.save(buf, np.random.default_rng(3).normal(size=(300, 3)) * [1.0, 2.0, 0.5] + [0.0, 5.0, -1.0])
        upload = client.post("/v1/datasets", files={"file": ("gauss.npy", buf.getvalue())}).json()
        assert upload["shape"] == [300, 3]
        follow_up = client.post("/v1/jobs", json={**TINY_CNF, "dataset": {"name": "upload", "id": upload["id"]}})
        follow_up = follow_up.json()["id"]
        wait_for_job(client, follow_up, ("succeeded",), timeout=120)
        dens = client.post(f"/v1/jobs/{follow_up}/log-density", json={"points": [[0.0, 5.0, -1.0]]})
        assert dens.status_code == 200 and math.isfinite(dens.json()["log_density"][0])
        assert client.post(f"/v1/jobs/{follow_up}/log-density", json={"points": [[0.0, 5.0]]}).status_code == 422
        job = client.get(f"/v1/jobs/{queued}").json()
        assert job["status"] == "cancelled" and job["started_at"] is None and job["step"] == 0


def test_sigterm_requeues_the_running_job_which_resumes_on_the_next_worker(make_settings, start_worker):
    settings = make_settings()
    with TestClient(create_app(settings)) as client:
        # long enough (in steps, ~0.2 s each) that the SIGTERM lands mid-training on a fast machine too
        spec = {**TINY_CNF, "training": {**TINY_CNF["training"], "iterations": 60, "eval_every": 60,
                                         "checkpoint_every": 5}}
        job_id = client.post("/v1/jobs", json=spec).json()["id"]
        first = start_worker(settings)
        wait_for_job(client, job_id, ("running",), timeout=120, pred=lambda j: j["step"] >= 2)
        first.terminate()  # SIGTERM: warm shutdown
        first.wait(60)
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "queued" and 2 <= job["step"] < 60, job
        stopped_at = job["step"]
        names = [c["name"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"]]
        assert f"step-{stopped_at:06d}.safetensors" in names  # checkpointed where it stopped

        second = start_worker(settings)
        job = wait_for_job(client, job_id, ("succeeded",), timeout=180)
        assert job["step"] == 60
        history = client.get(f"/v1/jobs/{job_id}/metrics").json()["history"]
        assert [r["step"] for r in history] == list(range(1, 61))  # no gap, no duplicate at the resume
        assert f"resuming from step-{stopped_at:06d}.safetensors" in second.log_path.read_text()


@pytest.mark.postgres
def test_uploaded_series_train_a_node_on_a_real_worker_then_forecast(shared):
    # long CSV with a missing cell; the worker resolves the stored .npz, trains, and the forecast
    # starts from the series' first observation, in the data's units
    rows = ["series_id,t,x,v"]
    rng = np.random.default_rng(0)
    for s in range(10):
        x0, v0 = rng.uniform(-1, 1, size=2)
        times = np.sort(rng.uniform(0, 6, size=12))
        for k, t in enumerate(times):
            x = np.exp(-0.1 * t) * (x0 * np.cos(t) + (v0 + 0.1 * x0) * np.sin(t))
            rows.append(f"s{s},{t},{x},{'' if k == 3 else v0}")
    settings, _ = shared
    with TestClient(create_app(settings)) as client:
        upload = client.post("/v1/datasets?kind=series", files={"file": ("osc.csv", "\n".join(rows).encode())}).json()
        assert upload["shape"] == [10, 12, 2]
        spec = {"model": {"type": "node", "hidden_dims": [8]}, "dataset": {"name": "series_upload", "id": upload["id"]},
                "solver": {"rtol": 1e-3, "atol": 1e-4, "adjoint": False},
                "training": {"iterations": 4, "batch_size": 4, "eval_every": 4, "lr": 1e-2}}
        job_id = client.post("/v1/jobs", json=spec).json()["id"]
        job = wait_for_job(client, job_id, ("succeeded",), timeout=120)
        assert job["metrics"]["test_interp_mse"] >= 0 and job["metrics"]["test_extrap_mse"] >= 0
        resp = client.post(f"/v1/jobs/{job_id}/forecast", json={"series": [{"t": [1.0], "y": [[0.5, -0.2]]}],
                                                                  "t": [1.0, 2.0, 8.0]})
        assert resp.status_code == 200, resp.text
        mean = np.asarray(resp.json()["forecasts"][0]["mean"])
        assert mean.shape == (3, 2) and np.allclose(mean[0], [0.5, -0.2], rtol=1e-12) and np.isfinite(mean).all()
