"""Job specs and served answers over HTTP: per-family defaults in the stored spec, data files the
service lacks refused at submission (422 naming what is missing) instead of a 202 and a failed job,
and log-densities that do not depend on the other clients a request shares a micro-batch with."""

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


def test_concurrent_http_clients_get_the_answer_their_point_gets_alone(client, make_settings):
    # a Hutchinson CNF: its noise is keyed per point, so micro-batches shared with other clients
    # (service/batching.py) do not change a point's estimate; loose tolerances would show joint stepping
    import threading

    import numpy as np

    from node_engine.training import build_trainer
    from jobs.artifacts import LocalArtifactStore, checkpoint_prefix
    from service.schemas import JobCreate

    spec = {"model": {"type": "cnf", "hidden_dims": [8, 8], "trace_estimator": "hutchinson"},
            "dataset": {"name": "8gaussians", "n_samples": 512}, "solver": {"rtol": 1e-3, "atol": 1e-3},
            "training": {"iterations": 5, "batch_size": 64, "lr": 1e-2}}
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    trainer = build_trainer(JobCreate.model_validate(spec).model_dump(mode="json"))
    trainer.run()
    LocalArtifactStore(make_settings().artifact_dir).put(f"{checkpoint_prefix(job_id)}/final.safetensors",
                                                         trainer.checkpoint())
    url = f"/v1/jobs/{job_id}/log-density"
    rng = np.random.default_rng(5)
    probe = [[0.4, -1.2]]
    alone = client.post(url, json={"points": probe}).json()["log_density"][0]
    bodies = [probe + rng.normal(scale=2.0, size=(n, 2)).tolist() for n in (3, 0, 2000, 7, 1, 500)]
    answers: list = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def ask(i: int) -> None:
        start.wait()
        answers[i] = client.post(url, json={"points": bodies[i]}).json()["log_density"][0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    np.testing.assert_allclose(answers, alone, rtol=1e-6)
