"""Run metadata and lifecycle (issue 15): ``name``/``tags`` listed and filtered in SQL (SQLite and
PostgreSQL), ``DELETE /v1/jobs/{id}``, ``GET``/``DELETE /v1/datasets``, and ``init_from``
(fine-tuning from another job's checkpoint), with owner isolation on each.

Jobs are trained by ``worker.runner.run_job`` (what the Celery task runs) on the real job store;
the broker is the in-process one (nothing consumes it). Checkpoint tensors are read back with the
safetensors library, not with the code under test.
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from jobs.artifacts import LocalArtifactStore, checkpoint_prefix
from jobs.settings import Settings
from jobs.store import JobStore
from jobs.tables import make_engine
from service.app import create_app
from worker.runner import WorkerContext, run_job

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-fedcba9876543210"
A, B = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
TINY = {"model": {"type": "mlp", "hidden": 8}, "dataset": {"name": "digits", "n_samples": 200},
        "training": {"iterations": 4, "batch_size": 32, "eval_every": 4, "checkpoint_every": 2}}


def make(tmp_path, database_url: str, **overrides) -> Settings:
    return Settings(database_url=database_url, broker_url="memory://", artifact_dir=tmp_path / "artifacts",
                    device="cpu", cancel_poll_s=0.05, **overrides)


@pytest.fixture
def settings(tmp_path, database_url) -> Settings:
    return make(tmp_path, database_url, api_keys=f"alice:{ALICE},bob:{BOB}")


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def ctx(settings: Settings) -> WorkerContext:
    return WorkerContext(settings, JobStore.from_settings(settings), LocalArtifactStore(settings.artifact_dir))


def submit(client, headers=A, **fields) -> dict:
    resp = client.post("/v1/jobs", json={**TINY, **fields}, headers=headers)
    assert resp.status_code == 202, resp.text
    return resp.json()


def ids(resp) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [j["id"] for j in resp.json()["jobs"]]


def problem_field(resp, status: int) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    return resp.json()["errors"][0]["field"]


def test_name_and_tags_are_listed_and_filtered(client):
    j1 = submit(client, name="Moons baseline", tags=["cnf", "baseline"])
    j2 = submit(client, name="moons 100% lr", tags=["cnf", "cnf"])  # the duplicate tag is dropped
    j3 = submit(client, name="digits_run")
    j4 = submit(client)
    other = submit(client, headers=B, name="moons of bob", tags=["cnf"])
    assert (j1["name"], j1["tags"]) == ("Moons baseline", ["cnf", "baseline"]) and j2["tags"] == ["cnf"]
    assert (j4["name"], j4["tags"]) == (None, [])
    assert client.get(f"/v1/jobs/{j1['id']}", headers=A).json()["tags"] == ["cnf", "baseline"]

    assert ids(client.get("/v1/jobs?tag=cnf", headers=A)) == [j2["id"], j1["id"]]
    assert ids(client.get("/v1/jobs?tag=baseline", headers=A)) == [j1["id"]]
    assert ids(client.get("/v1/jobs?tag=cn", headers=A)) == []  # tags match exactly
    assert ids(client.get("/v1/jobs?tag=cnf", headers=B)) == [other["id"]]
    assert ids(client.get("/v1/jobs", params={"name": "MOONS"}, headers=A)) == [j2["id"], j1["id"]]
    assert ids(client.get("/v1/jobs", params={"name": "100%"}, headers=A)) == [j2["id"]]
    assert ids(client.get("/v1/jobs", params={"name": "s_r"}, headers=A)) == [j3["id"]]  # "_" is literal
    assert ids(client.get("/v1/jobs", params={"name": "s%r"}, headers=A)) == []  # "%" is literal
    assert ids(client.get("/v1/jobs", params={"name": "moons", "tag": "baseline"}, headers=A)) == [j1["id"]]
    page = client.get("/v1/jobs", params={"tag": "cnf", "limit": 1}, headers=A).json()
    rest = client.get("/v1/jobs", params={"tag": "cnf", "limit": 1, "page_token": page["next_page_token"]},
                      headers=A).json()
    assert [j["id"] for j in page["jobs"] + rest["jobs"]] == [j2["id"], j1["id"]] and rest["next_page_token"] is None

    for fields, field in [({"tags": ["has space"]}, "tags[0]"), ({"tags": ["x"] * 33}, "tags"),
                          ({"name": "x" * 201}, "name"), ({"name": "two\nlines"}, "name"), ({"name": ""}, "name")]:
        assert problem_field(client.post("/v1/jobs", json={**TINY, **fields}, headers=A), 422) == field


def test_an_existing_database_without_the_new_tables_keeps_working(tmp_path):
    settings = make(tmp_path, f"sqlite:///{tmp_path / 'old.db'}")
    with TestClient(create_app(settings)) as c:
        old = submit(c, headers={})
    engine = make_engine(settings.database_url)  # the schema of the previous release: no events, no tags
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE job_events"))
        conn.execute(text("DROP TABLE job_tags"))
        conn.execute(text("UPDATE jobs SET spec = json_remove(spec, '$.name', '$.tags', '$.init_from'), "
                          "status = 'succeeded'"))
    engine.dispose()
    with TestClient(create_app(settings)) as c:
        job = c.get(f"/v1/jobs/{old['id']}").json()
        assert (job["name"], job["tags"], job["status"]) == (None, [], "succeeded")
        new = submit(c, headers={}, tags=["t"])
        assert ids(c.get("/v1/jobs?tag=t")) == [new["id"]] and len(ids(c.get("/v1/jobs"))) == 2
        with c.stream("GET", f"/v1/jobs/{old['id']}/events") as r:  # a finished job from before: ends at once
            assert r.read().decode().strip().startswith("retry:")


def test_delete_job_cancels_and_removes_everything_and_is_owner_only(client, settings):
    done = submit(client)["id"]
    assert run_job(done, ctx(settings)) == "succeeded"
    assert settings.artifact_dir.joinpath(checkpoint_prefix(done)).is_dir()
    assert client.get(f"/v1/jobs/{done}/plots/training.png", headers=A).status_code == 200

    assert client.delete(f"/v1/jobs/{done}", headers=B).status_code == 404  # another key: as if unknown
    assert client.get(f"/v1/jobs/{done}", headers=A).status_code == 200
    resp = client.delete(f"/v1/jobs/{done}", headers=A)
    assert resp.status_code == 204 and resp.content == b""
    for path in ("", "/metrics", "/checkpoints", "/events"):
        assert client.get(f"/v1/jobs/{done}{path}", headers=A).status_code == 404
    assert list(settings.artifact_dir.joinpath("jobs", done).rglob("*.*")) == []
    assert client.delete(f"/v1/jobs/{done}", headers=A).status_code == 404

    queued = submit(client)["id"]
    assert client.delete(f"/v1/jobs/{queued}", headers=A).status_code == 204
    assert run_job(queued, ctx(settings)) == "skipped"  # its message arrives after the delete

    # A running job is cancelled: its worker is fenced out and stops without writing anything more.
    running = submit(client, training={**TINY["training"], "iterations": 100_000, "checkpoint_every": 5})["id"]
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(run_job(running, ctx(settings))))
    thread.start()
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{running}", headers=A).json()["step"] < 6:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.delete(f"/v1/jobs/{running}", headers=A).status_code == 204
    thread.join(60)
    assert result == ["superseded"]
    assert list(settings.artifact_dir.joinpath("jobs", running).rglob("*.safetensors")) == []
    assert ids(client.get("/v1/jobs", headers=A)) == []


def _csv(rows: int, seed: int) -> bytes:
    data = np.random.default_rng(seed).normal(size=(rows, 2))
    return "\n".join(f"{x},{y}" for x, y in data).encode()


def test_datasets_are_listed_per_owner_paginated_and_deleted_unless_in_use(client, settings):
    uploaded = []
    for i in range(3):
        resp = client.post("/v1/datasets", files={"file": (f"d{i}.csv", io.BytesIO(_csv(20 + i, i)))}, headers=A)
        assert resp.status_code == 201, resp.text
        uploaded.append(resp.json())
    assert uploaded[0]["shape"] == [20, 2] and uploaded[0]["kind"] == "array" and uploaded[0]["filename"] == "d0.csv"
    bobs = client.post("/v1/datasets", files={"file": ("b.csv", io.BytesIO(_csv(12, 9)))}, headers=B).json()

    seen, token = [], None
    while True:
        page = client.get("/v1/datasets", params={"limit": 2, **({"page_token": token} if token else {})},
                          headers=A).json()
        seen += page["datasets"]
        token = page["next_page_token"]
        if token is None:
            break
    assert [d["id"] for d in seen] == [d["id"] for d in reversed(uploaded)]  # newest first, each once
    assert [d["id"] for d in client.get("/v1/datasets", headers=B).json()["datasets"]] == [bobs["id"]]
    assert problem_field(client.get("/v1/datasets", params={"page_token": "bm9wZQ"}, headers=A), 422) == "page_token"

    used = uploaded[0]["id"]
    job = client.post("/v1/jobs", headers=A, json={"model": {"type": "cnf", "hidden_dims": [4]},
                                                   "dataset": {"name": "upload", "id": used}}).json()["id"]
    resp = client.delete(f"/v1/datasets/{used}", headers=A)
    assert resp.status_code == 409 and job in resp.json()["detail"]
    assert client.delete(f"/v1/datasets/{bobs['id']}", headers=A).status_code == 404
    assert client.delete(f"/v1/datasets/{uploaded[1]['id']}", headers=A).status_code == 204
    assert not settings.artifact_dir.joinpath("datasets", f"{uploaded[1]['id']}.npy").exists()
    assert client.delete(f"/v1/datasets/{uploaded[1]['id']}", headers=A).status_code == 404
    client.post(f"/v1/jobs/{job}/cancel", headers=A)
    assert client.delete(f"/v1/datasets/{used}", headers=A).status_code == 204
    assert [d["id"] for d in client.get("/v1/datasets", headers=A).json()["datasets"]] == [uploaded[2]["id"]]


def _tensors(settings: Settings, job_id: str, name: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    data = (settings.artifact_dir / checkpoint_prefix(job_id) / name).read_bytes()
    return {k: v for k, v in load(data).items() if k.startswith("model.")}


def test_init_from_starts_from_the_source_checkpoint(client, settings):
    source = submit(client, training={**TINY["training"], "lr": 0.05})["id"]
    assert run_job(source, ctx(settings)) == "succeeded"
    # Fine-tune with a learning rate so small that the parameters cannot move: after training, the
    # model must still be the source's final one (a fresh start from the same seed is far from it).
    still = {**TINY["training"], "lr": 1e-12}
    tuned = submit(client, training=still, init_from={"job": source})
    assert tuned["spec"]["init_from"] == {"job": source, "checkpoint": "final.safetensors"}  # resolved
    fresh = submit(client, training=still)
    for job in (tuned["id"], fresh["id"]):
        assert run_job(job, ctx(settings)) == "succeeded"
    src, got, new = (_tensors(settings, j, "final.safetensors") for j in (source, tuned["id"], fresh["id"]))
    assert src and set(src) == set(got)
    for key in src:
        np.testing.assert_allclose(got[key], src[key], rtol=0, atol=1e-9)
    assert max(np.abs(new[k] - src[k]).max() for k in src) > 1e-2
    metrics = [client.get(f"/v1/jobs/{j}", headers=A).json()["metrics"] for j in (source, tuned["id"])]
    assert metrics[1]["test_accuracy"] == metrics[0]["test_accuracy"]
    # an earlier checkpoint by name
    assert submit(client, init_from={"job": source, "checkpoint": "step-000002.safetensors"})["spec"]["init_from"][
        "checkpoint"] == "step-000002.safetensors"

    cases = [({"job": "0" * 32}, "init_from.job"),
             ({"job": source, "checkpoint": "step-000003.safetensors"}, "init_from.checkpoint"),
             ({"job": source, "checkpoint": "../x.safetensors"}, "init_from.checkpoint")]
    for init, field in cases:
        assert problem_field(client.post("/v1/jobs", json={**TINY, "init_from": init}, headers=A), 422) == field
    other_model = {**TINY, "model": {"type": "mlp", "hidden": 9}, "init_from": {"job": source}}
    assert problem_field(client.post("/v1/jobs", json=other_model, headers=A), 422) == "init_from"
    # another key cannot start from (or learn of) alice's job
    assert problem_field(client.post("/v1/jobs", json={**TINY, "init_from": {"job": source}}, headers=B),
                         422) == "init_from.job"
    queued = submit(client)["id"]  # no checkpoint yet
    assert problem_field(client.post("/v1/jobs", json={**TINY, "init_from": {"job": queued}}, headers=A),
                         422) == "init_from.checkpoint"
    # the source of a queued fine-tuning job cannot be deleted
    user = submit(client, init_from={"job": source})["id"]
    resp = client.delete(f"/v1/jobs/{source}", headers=A)
    assert resp.status_code == 409 and user in resp.json()["detail"]
