"""Job specs over HTTP: per-family defaults in the stored spec, and data files the service lacks
refused at submission (422 naming what is missing) instead of a 202 and a failed job."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app

pytestmark = pytest.mark.redis


@pytest.fixture
def client(make_settings):
    with TestClient(create_app(make_settings())) as c:
        yield c


@pytest.mark.parametrize("model, dataset, batch", [({"type": "mlp"}, "digits", 128), ({"type": "cnf"}, "moons", 512),
                                                    ({"type": "odenet", "channels": 16}, "digits", 128)])
def test_family_batch_size_is_filled_in_and_stored(client, model, dataset, batch):
    resp = client.post("/v1/jobs", json={"model": model, "dataset": {"name": dataset}})
    assert resp.status_code == 202, resp.text
    assert resp.json()["spec"]["training"]["batch_size"] == batch


def test_mnist_without_files_is_422_naming_the_missing_files(client, monkeypatch, tmp_path):
    monkeypatch.delenv("ODEFORGE_MNIST_DIR", raising=False)
    resp = client.post("/v1/jobs", json={"model": {"type": "odenet"}, "dataset": {"name": "mnist"}})
    assert resp.status_code == 422 and resp.headers["content-type"].startswith("application/problem+json")
    errors = resp.json()["errors"]
    assert [e["field"] for e in errors] == ["dataset"] and "ODEFORGE_MNIST_DIR" in errors[0]["reason"]
    monkeypatch.setenv("ODEFORGE_MNIST_DIR", str(tmp_path))  # a directory without the IDX files
    resp = client.post("/v1/jobs", json={"model": {"type": "odenet"}, "dataset": {"name": "mnist"}})
    assert resp.status_code == 422 and "t10k-labels-idx1-ubyte" in resp.json()["errors"][0]["reason"]
    assert client.get("/v1/jobs").json()["jobs"] == []
