"""``GET /v1/jobs/{id}/plots/vector_field.png`` with the real app: a 2-D ``node`` job on Lotka–Volterra
gets the learned field beside the true one (a two-panel PNG); a 1-D series job, an augmented ``node``
job and a flow job get a 409 problem saying why."""

from __future__ import annotations

import io

import matplotlib.image
import pytest
from fastapi.testclient import TestClient

from jobs.artifacts import LocalArtifactStore, checkpoint_prefix, dataset_key
from service.app import create_app

SPEC = {"model": {"type": "node", "hidden_dims": [8]}, "dataset": {"name": "lotka_volterra", "n_samples": 10},
        "solver": {"rtol": 1e-2, "atol": 1e-3, "adjoint": False},
        "training": {"iterations": 2, "batch_size": 4, "lr": 1e-2}}


@pytest.fixture
def settings(make_settings):
    return make_settings()


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def _trained_job(client, settings, spec: dict, path: str | None = None) -> str:
    """Submit ``spec`` and store the checkpoint of a tiny in-process training run as its final one."""
    from node_engine.training import build_trainer
    from service.schemas import JobCreate

    resp = client.post("/v1/jobs", json=spec)
    assert resp.status_code == 202, resp.text
    normalized = JobCreate.model_validate(spec).model_dump(mode="json")
    if path is not None:
        normalized["dataset"]["path"] = path
    trainer = build_trainer(normalized)
    trainer.run()
    job_id = resp.json()["id"]
    LocalArtifactStore(settings.artifact_dir).put(f"{checkpoint_prefix(job_id)}/final.safetensors", trainer.checkpoint())
    return job_id


def _refused(resp, needle: str) -> None:
    assert resp.status_code == 409, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert needle in resp.json()["detail"], resp.json()


def test_vector_field_of_a_2d_node_job_beside_the_true_field(client, settings):
    job_id = _trained_job(client, settings, SPEC)
    resp = client.get(f"/v1/jobs/{job_id}/plots/vector_field.png")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    height, width, _ = matplotlib.image.imread(io.BytesIO(resp.content), format="png").shape
    assert width > 1.8 * height  # two panels: learned and true field (plus the colour bar)


def test_vector_field_is_refused_for_1d_augmented_and_flow_jobs(client, settings):
    rows = ["series_id,t,level"] + [f"s{s},{0.5 * t},{1 + 0.1 * t * (s + 1)}" for s in range(10) for t in range(6)]
    upload = client.post("/v1/datasets?kind=series", files={"file": ("one.csv", "\n".join(rows).encode())})
    assert upload.status_code == 201, upload.text
    series_id = upload.json()["id"]
    path = settings.artifact_dir / dataset_key(series_id, "series_upload")
    one_d = _trained_job(client, settings, {**SPEC, "dataset": {"name": "series_upload", "id": series_id}}, str(path))
    _refused(client.get(f"/v1/jobs/{one_d}/plots/vector_field.png"), "2-D")
    augmented = _trained_job(client, settings, {**SPEC, "model": {"type": "node", "hidden_dims": [8], "augment_dim": 1}})
    _refused(client.get(f"/v1/jobs/{augmented}/plots/vector_field.png"), "augment")
    flow = client.post("/v1/jobs", json={"model": {"type": "cnf"}, "dataset": {"name": "moons"}}).json()["id"]
    _refused(client.get(f"/v1/jobs/{flow}/plots/vector_field.png"), "timeseries")
