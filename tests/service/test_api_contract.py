"""HTTP contract of /v1 against SQLite and the real PostgreSQL, with the real Redis broker.

Status codes, problem+json bodies with field-level reasons, keyset pagination, idempotency,
cancellation of queued jobs, uploads, 409/422 of inference routes, 503 when the broker is down.
No worker runs here: jobs stay queued; the worker side of the store is driven through ``JobStore``.
"""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from jobs.artifacts import LocalArtifactStore
from jobs.store import JobStore
from jobs.tables import Job, make_engine, make_sessionmaker
from service.app import create_app

pytestmark = pytest.mark.redis

MINIMAL = {"model": {"type": "cnf"}, "dataset": {"name": "moons"}}
TINY = {"model": {"type": "cnf", "hidden_dims": [8, 8]}, "dataset": {"name": "moons", "n_samples": 256},
        "training": {"iterations": 3}}


@pytest.fixture
def settings(make_settings, database_url):
    return make_settings(database_url=database_url)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def store(settings, client):  # after `client`: the app has created the schema
    engine = make_engine(settings.database_url)
    yield JobStore(make_sessionmaker(engine))
    engine.dispose()


def assert_problem(resp, status: int, field: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["title"] and body["type"] and body["detail"]
    if field is not None:
        fields = [e["field"] for e in body.get("errors", [])]
        assert field in fields, body
        assert all(e["reason"] for e in body["errors"])
    return body


def queued_job_ids(redis_client, queue: str) -> list[str]:
    """Job ids in the Redis queue in delivery order, read straight from the broker's messages."""
    out = []
    for raw in reversed(redis_client.lrange(queue, 0, -1)):  # LPUSH + BRPOP: oldest at the right
        msg = json.loads(raw)
        args = json.loads(__import__("base64").b64decode(msg["body"]))[0]
        assert msg["headers"]["task"] == "worker.tasks.train"
        out.append(args[0])
    return out


# ---- submit -------------------------------------------------------------------------------------
def test_submit_minimal_spec_gets_documented_defaults_and_is_enqueued(client, redis_client, queue_name):
    resp = client.post("/v1/jobs", json=MINIMAL)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"] == 0.0 and job["error"] is None
    assert job["started_at"] is None and job["finished_at"] is None
    spec = job["spec"]
    # defaults of docs/architecture.md
    assert spec["model"]["hidden_dims"] == [64, 64, 64] and spec["model"]["trace_estimator"] == "exact"
    assert spec["solver"] == {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5, "adjoint": True,
                              "adjoint_norm": "seminorm", "adjoint_mode": "backsolve", "step_size": None,
                              "max_num_steps": 10000, "compile": "auto", "eval_rtol": None, "eval_atol": None}
    assert spec["training"]["iterations"] == 1000 and spec["training"]["batch_size"] == 512
    assert spec["dataset"]["n_samples"] == 20000
    assert client.get(resp.headers["location"]).json() == job
    assert queued_job_ids(redis_client, queue_name) == [job["id"]]


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"training": {"lerning_rate": 0.1}}, "training.lerning_rate"),
        ({"solver": {"rtol": 0.0}}, "solver.rtol"),
        ({"solver": {"atol": 1.0}}, "solver.atol"),
        ({"solver": {"method": "magic45"}}, "solver.method"),
        ({"solver": {"method": "kvaerno5"}}, "solver"),  # stiff with the (default) backsolve adjoint
        ({"solver": {"max_num_steps": 0}}, "solver.max_num_steps"),
        ({"solver": {"compile": "yes"}}, "solver.compile"),
        ({"training": {"iterations": 0}}, "training.iterations"),
        ({"training": {"batch_size": 10**7}}, "training.batch_size"),
        ({"training": {"lr": float("nan")}}, "training.lr"),
        ({"model": {"type": "cnf", "hidden_dims": [8, 0]}}, "model.hidden_dims[1]"),
        ({"model": {"type": "transformer"}}, "model"),
        ({"dataset": {"name": "imagenet"}}, "dataset.name"),
        ({"dataset": {"name": "upload"}}, "dataset"),
        ({"training": {"iterations": 5, "epochs": 1}}, "training"),
        ({"model": {"type": "odenet"}}, "body"),  # a classifier on 2-D points
        ({"extra": 1}, "extra"),
    ],
)
def test_invalid_spec_is_422_naming_the_field_and_creates_nothing(client, redis_client, queue_name, patch, field):
    body = {**MINIMAL, **patch}
    resp = client.post("/v1/jobs", content=json.dumps(body), headers={"content-type": "application/json"})
    assert_problem(resp, 422, field)
    assert client.get("/v1/jobs").json()["jobs"] == []
    assert queued_job_ids(redis_client, queue_name) == []


def test_unknown_job_is_404_problem(client):
    body = assert_problem(client.get("/v1/jobs/0123456789abcdef0123456789abcdef"), 404)
    assert body["instance"] == "/v1/jobs/0123456789abcdef0123456789abcdef"
    for path in ("/metrics", "/checkpoints"):
        assert_problem(client.get(f"/v1/jobs/nope{path}"), 404)
    assert_problem(client.post("/v1/jobs/nope/cancel"), 404)
    assert_problem(client.post("/v1/jobs/nope/log-density", json={"points": [[0, 0]]}), 404)
    assert_problem(client.get("/v1/no-such-route"), 404)


# ---- idempotency --------------------------------------------------------------------------------
def test_idempotency_key_returns_the_same_job_once_enqueued(client, redis_client, queue_name):
    first = client.post("/v1/jobs", json=TINY, headers={"Idempotency-Key": "abc-1"})
    again = client.post("/v1/jobs", json=TINY, headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true" and again.headers["location"] == first.headers["location"]
    other = client.post("/v1/jobs", json=TINY, headers={"Idempotency-Key": "abc-2"})
    assert other.json()["id"] != first.json()["id"]
    assert queued_job_ids(redis_client, queue_name) == [first.json()["id"], other.json()["id"]]
    conflict = client.post("/v1/jobs", json=MINIMAL, headers={"Idempotency-Key": "abc-1"})
    assert_problem(conflict, 422, "Idempotency-Key")
    assert len(client.get("/v1/jobs").json()["jobs"]) == 2


# ---- listing ------------------------------------------------------------------------------------
def test_list_paginates_newest_first_and_filters_by_status(client):
    ids = [client.post("/v1/jobs", json=TINY).json()["id"] for _ in range(5)]
    for job_id in ids[1:3]:
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    seen, token, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"page_token": token} if token else {})}
        body = client.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in body["jobs"]]
        pages += 1
        token = body["next_page_token"]
        if token is None:
            break
    assert seen == ids[::-1] and pages == 3
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in cancelled["jobs"]] == ids[2:0:-1] and cancelled["next_page_token"] is None
    queued = client.get("/v1/jobs", params={"status": "queued", "limit": 2}).json()
    assert [j["id"] for j in queued["jobs"]] == [ids[4], ids[3]]
    rest = client.get("/v1/jobs", params={"status": "queued", "page_token": queued["next_page_token"]}).json()
    assert [j["id"] for j in rest["jobs"]] == [ids[0]]
    assert_problem(client.get("/v1/jobs", params={"status": "sleeping"}), 422, "status")
    assert_problem(client.get("/v1/jobs", params={"limit": 0}), 422, "limit")
    assert_problem(client.get("/v1/jobs", params={"page_token": "garbage!"}), 422, "page_token")


# ---- cancellation -------------------------------------------------------------------------------
def test_cancel_queued_job_is_immediate_and_the_worker_skips_it(client, store):
    job_id = client.post("/v1/jobs", json=TINY).json()["id"]
    resp = client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 200
    job = resp.json()
    assert job["status"] == "cancelled" and job["finished_at"] is not None and job["started_at"] is None
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"  # idempotent
    assert store.claim(job_id) is None  # a worker receiving the message later does not start it


def test_cancel_running_is_cooperative_and_finished_job_is_409(client, store):
    job_id = client.post("/v1/jobs", json=TINY).json()["id"]
    row, token = store.claim(job_id)
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    resp = client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 202 and resp.json()["status"] == "running"
    assert store.should_stop(row, token)
    assert store.finish(row, token, "cancelled")
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"

    done_id = client.post("/v1/jobs", json=TINY).json()["id"]
    row, token = store.claim(done_id)
    assert store.finish(row, token, "succeeded", latest={"loss": 1.5})
    assert_problem(client.post(f"/v1/jobs/{done_id}/cancel"), 409)
    assert client.get(f"/v1/jobs/{done_id}").json()["metrics"] == {"loss": 1.5}


def test_stale_worker_writes_are_fenced(client, store):
    job_id = client.post("/v1/jobs", json=TINY).json()["id"]
    row, old = store.claim(job_id)
    assert store.claim(job_id) is None  # a duplicate message while the lease is live is skipped
    with store.sessions.begin() as s:  # the first worker stops renewing: its lease runs out ...
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=datetime.now(timezone.utc)))
    row, new = store.claim(job_id)  # ... and the redelivered message goes to another worker
    assert new == old + 1
    assert not store.record(row, old, [{"step": 1, "loss": 9.0}], step=1, total_steps=3, latest={})
    assert not store.finish(row, old, "succeeded")
    assert store.record(row, new, [{"step": 1, "loss": 1.0}], step=1, total_steps=3, latest={"loss": 1.0})
    hist = client.get(f"/v1/jobs/{job_id}/metrics").json()["history"]
    assert hist == [{"step": 1, "loss": 1.0}]
    assert client.get(f"/v1/jobs/{job_id}").json()["progress"] == pytest.approx(1 / 3)
    assert store.get_job(job_id).lease_expires_at > datetime.now(timezone.utc)  # held, renewed by writes
    assert store.release(row, new) and not store.release(row, old)
    job = store.get_job(job_id)
    assert job.status == "queued" and job.lease_expires_at is None and job.attempts == 1  # release gives it back


# ---- metrics ------------------------------------------------------------------------------------
def test_metrics_history_pages_and_since_step(client, store):
    job_id = client.post("/v1/jobs", json=TINY).json()["id"]
    row, token = store.claim(job_id)
    rows = [{"step": s, "loss": 10.0 / s, "nfe_forward": 20 + s, "nfe_backward": 30 + s} for s in range(1, 26)]
    assert store.record(row, token, rows[:20], step=20, total_steps=25, latest={})
    assert store.record(row, token, rows[20:] + [{"step": 25, "test_nll": 1.25}], step=25, total_steps=25, latest={})
    got, token_, pages = [], None, 0
    while True:
        body = client.get(f"/v1/jobs/{job_id}/metrics",
                          params={"limit": 10, **({"page_token": token_} if token_ else {})}).json()
        got += body["history"]
        pages += 1
        token_ = body["next_page_token"]
        if token_ is None:
            break
    assert pages == 3 and [r["step"] for r in got] == list(range(1, 26))
    assert got[-1] == {**rows[-1], "test_nll": 1.25}  # eval values merge into the step's row
    since = client.get(f"/v1/jobs/{job_id}/metrics", params={"since_step": 22}).json()
    assert [r["step"] for r in since["history"]] == [23, 24, 25] and since["next_page_token"] is None
    assert_problem(client.get(f"/v1/jobs/{job_id}/metrics", params={"since_step": "x"}), 422, "since_step")


# ---- checkpoints --------------------------------------------------------------------------------
def test_checkpoints_list_download_and_names_cannot_escape(client, settings):
    job_id = client.post("/v1/jobs", json=TINY).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}/checkpoints").json() == {"checkpoints": []}
    artifacts = LocalArtifactStore(settings.artifact_dir)
    artifacts.put(f"jobs/{job_id}/checkpoints/step-000002.safetensors", b"x" * 17)
    (settings.artifact_dir / "secret.safetensors").write_bytes(b"secret")
    listed = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"]
    assert listed == [{"name": "step-000002.safetensors", "size_bytes": 17,
                       "url": f"/v1/jobs/{job_id}/checkpoints/step-000002.safetensors"}]
    resp = client.get(listed[0]["url"])
    assert resp.status_code == 200 and resp.content == b"x" * 17
    assert resp.headers["content-type"] == "application/octet-stream"
    for name in ("final.safetensors", "..%2F..%2Fsecret.safetensors", "%2E%2E", "..\\secret.safetensors"):
        assert_problem(client.get(f"/v1/jobs/{job_id}/checkpoints/{name}"), 404)


# ---- inference preconditions --------------------------------------------------------------------
def test_inference_on_job_without_checkpoint_or_wrong_type_is_409(client):
    cnf = client.post("/v1/jobs", json=TINY).json()["id"]
    odenet = client.post("/v1/jobs", json={"model": {"type": "odenet", "channels": 4},
                                           "dataset": {"name": "digits"}}).json()["id"]
    body = assert_problem(client.post(f"/v1/jobs/{cnf}/log-density", json={"points": [[0.0, 0.0]]}), 409)
    assert body["type"].endswith("no-checkpoint")
    assert_problem(client.post(f"/v1/jobs/{cnf}/samples", json={"n": 3}), 409)
    body = assert_problem(client.post(f"/v1/jobs/{odenet}/log-density", json={"points": [[0.0, 0.0]]}), 409)
    assert body["type"].endswith("wrong-model-type")
    assert_problem(client.post(f"/v1/jobs/{cnf}/predict", json={"inputs": [[[0.0]]]}), 409)
    assert_problem(client.get(f"/v1/jobs/{cnf}/plots/density.png"), 409)
    assert_problem(client.get(f"/v1/jobs/{cnf}/plots/weights.png"), 404)


def test_log_density_points_validation_is_422(make_settings, database_url):
    with TestClient(create_app(make_settings(database_url=database_url, max_points=3))) as client:
        job = client.post("/v1/jobs", json=TINY).json()["id"]
        url = f"/v1/jobs/{job}/log-density"
        nan = '{"points": [[0.0, NaN]]}'
        assert_problem(client.post(url, content=nan, headers={"content-type": "application/json"}), 422, "points[0][1]")
        assert_problem(client.post(url, json={"points": [[0, 0]] * 4}), 422, "points")
        assert_problem(client.post(url, json={"points": []}), 422, "points")
        assert_problem(client.post(url, json={"points": [[0, 0]], "extra": 1}), 422, "extra")
        assert_problem(client.post(f"/v1/jobs/{job}/samples", json={"n": 0}), 422, "n")


# ---- datasets -----------------------------------------------------------------------------------
def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def test_dataset_upload_npy_and_csv_then_usable_in_a_job(client, settings):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(40, 2))
    resp = client.post("/v1/datasets", files={"file": ("points.npy", _npy(data), "application/octet-stream")})
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["shape"] == [40, 2] and ds["dtype"] == "float32"  # float64 is stored as float32 unless asked
    stored = np.load(settings.artifact_dir / "datasets" / f"{ds['id']}.npy", allow_pickle=False)
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored, data.astype(np.float32))
    resp = client.post("/v1/datasets?dtype=float64",
                       files={"file": ("points.npy", _npy(data), "application/octet-stream")})
    assert resp.status_code == 201 and resp.json()["dtype"] == "float64"
    stored = np.load(settings.artifact_dir / "datasets" / f"{resp.json()['id']}.npy", allow_pickle=False)
    np.testing.assert_array_equal(stored, data)
    csv = "x,y,z\n" + "\n".join(",".join(f"{v:.6f}" for v in row) for row in rng.normal(size=(12, 3)))
    resp = client.post("/v1/datasets", files={"file": ("points.csv", csv.encode(), "text/csv")})
    assert resp.status_code == 201 and resp.json()["shape"] == [12, 3]
    job = client.post("/v1/jobs", json={"model": {"type": "cnf", "hidden_dims": [8]},
                                        "dataset": {"name": "upload", "id": ds["id"]}})
    assert job.status_code == 202 and job.json()["spec"]["dataset"]["id"] == ds["id"]
    missing = client.post("/v1/jobs", json={"model": {"type": "cnf"},
                                            "dataset": {"name": "upload", "id": "f" * 32}})
    assert_problem(missing, 422, "dataset.id")


@pytest.mark.parametrize(
    "name, content",
    [
        ("nan.csv", b"1,2\n" * 11 + b"nan,1\n"),
        ("short.csv", b"1,2\n3,4\n"),
        ("objects.npy", _npy(np.array([{"a": 1}] * 20, dtype=object))),  # would need unpickling
        ("cube.npy", _npy(np.zeros((20, 2, 2)))),
        ("text.csv", b"a,b\nc,d\n" * 10),
        ("points.exe", b"MZ\x90\x00"),
    ],
)
def test_bad_uploads_are_422_and_store_nothing(client, settings, name, content):
    assert_problem(client.post("/v1/datasets", files={"file": (name, content)}), 422, "file")
    assert not (settings.artifact_dir / "datasets").exists() or not any((settings.artifact_dir / "datasets").iterdir())


def test_upload_or_body_over_the_size_limit_is_413(make_settings, database_url):
    settings = make_settings(database_url=database_url, max_upload_bytes=2048, max_body_bytes=8192)
    with TestClient(create_app(settings)) as client:
        big = _npy(np.random.default_rng(0).normal(size=(200, 2)))  # 3.3 kB: over the upload limit only
        assert_problem(client.post("/v1/datasets", files={"file": ("big.npy", big)}), 413)
        huge = {**TINY, "training": {"iterations": 3, "padding": "x" * 10_000}}
        assert_problem(client.post("/v1/jobs", json=huge), 413)
        assert client.get("/v1/jobs").json()["jobs"] == []


# ---- broker down, health, metrics ---------------------------------------------------------------
def test_broker_down_is_503_and_leaves_nothing(make_settings, database_url):
    settings = make_settings(database_url=database_url, broker_url="redis://127.0.0.1:1/0", broker_timeout_s=1.0)
    with TestClient(create_app(settings)) as client:
        body = assert_problem(client.post("/v1/jobs", json=TINY, headers={"Idempotency-Key": "k"}), 503)
        assert body["type"].endswith("broker-unavailable")
        assert client.get("/v1/jobs").json() == {"jobs": [], "next_page_token": None}
        ready = assert_problem(client.get("/readyz"), 503, "broker")
        assert "database" not in [e["field"] for e in ready["errors"]]
        assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_healthz_prometheus_and_openapi(client):
    assert client.get("/readyz").json().items() >= {"database": "ok", "broker": "ok"}.items()
    client.post("/v1/jobs", json=TINY)
    text = client.get("/metrics").text
    assert 'odeforge_jobs{status="queued"} 1.0' in text
    assert "odeforge_jobs_submitted_total 1.0" in text
    assert 'odeforge_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in text
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/metrics",
                 "/v1/jobs/{job_id}/checkpoints", "/v1/jobs/{job_id}/checkpoints/{name}",
                 "/v1/jobs/{job_id}/log-density", "/v1/jobs/{job_id}/samples", "/v1/jobs/{job_id}/predict",
                 "/v1/datasets", "/v1/jobs/{job_id}/plots/{name}.png", "/healthz", "/readyz", "/metrics"):
        assert path in paths, path
