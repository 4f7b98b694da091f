"""API keys (``ODEFORGE_API_KEYS``): bearer authentication on every endpoint but the health checks,
and jobs (and uploaded data sets) private to the key that created them: another key gets the same
404 as for an id that does not exist, so it cannot even learn that the job exists.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient

from jobs.settings import Settings, parse_api_keys
from service.app import create_app

pytestmark = pytest.mark.redis

ALICE, BOB, CAROL = "alice-key-0123456789abcdef", "bob-key-fedcba9876543210", "carol-plain-key-0000000000"
TINY = {"model": {"type": "cnf", "hidden_dims": [8, 8]}, "dataset": {"name": "moons", "n_samples": 256},
        "training": {"iterations": 1}}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(make_settings):
    settings = make_settings(api_keys=f"alice:{ALICE}, bob:{BOB},{CAROL}")
    with TestClient(create_app(settings)) as c:
        yield c


def assert_problem(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    return resp.json()


def test_every_endpoint_but_health_needs_a_known_key(client):
    job_id = client.post("/v1/jobs", json=TINY, headers=auth(ALICE)).json()["id"]
    routes = [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", f"/v1/jobs/{job_id}"),
              ("POST", f"/v1/jobs/{job_id}/cancel"), ("GET", f"/v1/jobs/{job_id}/metrics"),
              ("GET", f"/v1/jobs/{job_id}/checkpoints"), ("GET", f"/v1/jobs/{job_id}/checkpoints/final.safetensors"),
              ("POST", f"/v1/jobs/{job_id}/log-density"), ("POST", f"/v1/jobs/{job_id}/samples"),
              ("POST", f"/v1/jobs/{job_id}/predict"), ("GET", f"/v1/jobs/{job_id}/plots/training.png"),
              ("POST", "/v1/datasets"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs"),
              ("GET", f"/v1/jobs/{job_id}/events"), ("DELETE", f"/v1/jobs/{job_id}"), ("GET", "/v1/datasets"),
              ("DELETE", f"/v1/datasets/{'0' * 32}"), ("GET", "/redoc"), ("GET", "/docs-assets/swagger-ui.css"),
              ("GET", "/v1/no-such-route")]
    bad_headers = [{}, auth("wrong-key-0000000000000000"), {"Authorization": ALICE},
                   {"Authorization": f"Basic {ALICE}"}, auth(""), auth(ALICE[:-1]), auth(ALICE + "x")]
    for method, path in routes:
        for headers in bad_headers:
            resp = client.request(method, path, headers=headers, json=TINY if method == "POST" else None)
            body = assert_problem(resp, 401)
            assert resp.headers["www-authenticate"].startswith("Bearer"), (method, path)
            assert body["type"].endswith("/unauthorized")
    # Nothing the refused requests asked for happened.
    assert [j["id"] for j in client.get("/v1/jobs", headers=auth(ALICE)).json()["jobs"]] == [job_id]
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).json()["status"] == "queued"
    for path in ("/healthz", "/readyz"):
        assert client.get(path).status_code == 200
    assert client.get("/metrics", headers=auth(BOB)).status_code == 200


def test_jobs_are_private_to_the_key_that_created_them(client):
    a = client.post("/v1/jobs", json=TINY, headers=auth(ALICE)).json()["id"]
    b = client.post("/v1/jobs", json=TINY, headers=auth(BOB)).json()["id"]
    c = client.post("/v1/jobs", json=TINY, headers=auth(CAROL)).json()["id"]
    assert [j["id"] for j in client.get("/v1/jobs", headers=auth(ALICE)).json()["jobs"]] == [a]
    assert [j["id"] for j in client.get("/v1/jobs", headers=auth(BOB)).json()["jobs"]] == [b]
    assert [j["id"] for j in client.get("/v1/jobs", params={"status": "queued"},
                                        headers=auth(CAROL)).json()["jobs"]] == [c]

    unknown = "0" * 32
    for method, suffix, body in [("GET", "", None), ("POST", "/cancel", None), ("GET", "/metrics", None),
                                 ("GET", "/checkpoints", None), ("GET", "/checkpoints/final.safetensors", None),
                                 ("POST", "/log-density", {"points": [[0.0, 0.0]]}), ("POST", "/samples", {"n": 2}),
                                 ("GET", "/plots/training.png", None)]:
        theirs = client.request(method, f"/v1/jobs/{a}{suffix}", headers=auth(BOB), json=body)
        missing = client.request(method, f"/v1/jobs/{unknown}{suffix}", headers=auth(BOB), json=body)
        assert theirs.status_code == missing.status_code == 404, (suffix, theirs.text)
        # Same answer as for an unknown id, apart from the id itself: existence does not leak.
        assert theirs.json()["detail"].replace(a, "ID") == missing.json()["detail"].replace(unknown, "ID")
    job = client.get(f"/v1/jobs/{a}", headers=auth(ALICE)).json()
    assert job["status"] == "queued"  # Bob's cancel did not touch it


def test_idempotency_keys_and_uploads_are_per_key(client):
    first = client.post("/v1/jobs", json=TINY, headers={**auth(ALICE), "Idempotency-Key": "nightly-1"})
    other = client.post("/v1/jobs", json=TINY, headers={**auth(BOB), "Idempotency-Key": "nightly-1"})
    assert first.status_code == other.status_code == 202
    assert first.json()["id"] != other.json()["id"]  # Bob's retry key does not replay Alice's job
    again = client.post("/v1/jobs", json=TINY, headers={**auth(ALICE), "Idempotency-Key": "nightly-1"})
    assert again.json()["id"] == first.json()["id"] and again.headers.get("idempotent-replayed") == "true"

    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).normal(size=(40, 2)))
    ds = client.post("/v1/datasets", files={"file": ("d.npy", buf.getvalue())}, headers=auth(ALICE)).json()["id"]
    spec = {**TINY, "dataset": {"name": "upload", "id": ds}}
    assert client.post("/v1/jobs", json=spec, headers=auth(ALICE)).status_code == 202
    body = assert_problem(client.post("/v1/jobs", json=spec, headers=auth(BOB)), 422)
    assert body["errors"][0]["field"] == "dataset.id"


def test_key_configuration_is_validated_and_off_by_default(make_settings):
    assert parse_api_keys(f"alice:{ALICE},{CAROL}") == {ALICE: "alice", CAROL: parse_api_keys(CAROL)[CAROL]}
    assert parse_api_keys(CAROL)[CAROL].startswith("key-") and CAROL not in parse_api_keys(CAROL)[CAROL]
    for bad in ("alice:short", f"alice:{ALICE},bob:{ALICE}", f":{ALICE}"):
        with pytest.raises(ValueError):
            Settings(api_keys=bad)
    assert "alice-key" not in repr(Settings(api_keys=f"alice:{ALICE}"))  # a secret: not in logs or reprs
    with TestClient(create_app(make_settings())) as c:  # unset: open, single-user default
        assert c.post("/v1/jobs", json=TINY).status_code == 202 and len(c.get("/v1/jobs").json()["jobs"]) == 1
