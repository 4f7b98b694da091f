"""Time series over HTTP with the real app: uploads of series (long CSV), a ``node`` job on them, and
``POST /v1/jobs/{id}/forecast``: answers in the data's units that do not depend on the other series
of the request; a ``latent_ode`` job's posterior draws (``samples``, reproducible per ``seed``); an
``rnn`` job's deterministic answers; bad input is a 422/409 problem naming the field, and nothing is stored."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from jobs.artifacts import LocalArtifactStore, checkpoint_prefix
from service.app import create_app

SPEC = {"model": {"type": "node", "hidden_dims": [8]}, "dataset": {"name": "lotka_volterra", "n_samples": 10},
        "solver": {"rtol": 1e-2, "atol": 1e-3, "eval_rtol": 1e-7, "eval_atol": 1e-8, "adjoint": False},
        "training": {"iterations": 3, "batch_size": 4, "lr": 1e-2}}


LATENT = {"model": {"type": "latent_ode", "latent_dim": 2, "hidden": 6, "rec_hidden": 4},
          "dataset": {"name": "spirals", "n_samples": 10, "n_points": 6},
          "solver": {"rtol": 1e-3, "atol": 1e-4, "eval_rtol": 1e-7, "eval_atol": 1e-8, "adjoint": False},
          "training": {"iterations": 2, "batch_size": 4, "lr": 1e-2}}


@pytest.fixture
def settings(make_settings):
    return make_settings(max_points=200, max_forecast_samples=5)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def _trained_job(client, settings, spec) -> str:
    """A job submitted over HTTP whose checkpoint is trained here (no worker needed)."""
    from node_engine.training import build_trainer
    from service.schemas import JobCreate

    resp = client.post("/v1/jobs", json=spec)
    assert resp.status_code == 202, resp.text
    trainer = build_trainer(JobCreate.model_validate(spec).model_dump(mode="json"))
    trainer.run()
    LocalArtifactStore(settings.artifact_dir).put(f"{checkpoint_prefix(resp.json()['id'])}/final.safetensors",
                                                  trainer.checkpoint())
    return resp.json()["id"]


@pytest.fixture
def job_id(client, settings):
    return _trained_job(client, settings, SPEC)


def _problem(resp, status: int, field: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert field in [e["field"] for e in body["errors"] or []], body
    return body


def test_forecast_alone_equals_inside_a_batch(client, job_id):
    url = f"/v1/jobs/{job_id}/forecast"
    probe = {"t": [0.0, 0.7], "y": [[1.1, 0.6], [None, 0.5]]}
    times = [0.0, 0.5, 2.0, 6.0]
    alone = client.post(url, json={"series": [probe], "t": times})
    assert alone.status_code == 200, alone.text
    body = alone.json()
    assert body["nfe"] > 0 and body["checkpoint"] == "final.safetensors"
    (answer,) = body["forecasts"]
    assert answer["t"] == times and np.asarray(answer["mean"]).shape == (4, 2)
    np.testing.assert_allclose(answer["mean"][0], [1.1, 0.6], rtol=1e-12)  # the data's units
    others = [{"t": [s], "y": [[1.5 - s, 0.4 + s]]} for s in (-1.0, -0.3, 0.0)]
    batch = client.post(url, json={"series": [others[0], probe, *others[1:]], "t": times})
    assert batch.status_code == 200, batch.text
    batch = batch.json()
    np.testing.assert_allclose(batch["forecasts"][1]["mean"], answer["mean"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("body, status, field", [
    ({"series": [{"t": [0.0], "y": [[1.0, 1.0]]}], "t": [1.0, 0.5]}, 422, "t[1]"),
    ({"series": [{"t": [0.0, 1.0, 0.5], "y": [[1, 1]] * 3}], "t": [2.0]}, 422, "series[0].t[2]"),
    ({"series": [{"t": [0.0], "y": [[1.0, 1.0, 1.0]]}], "t": [1.0]}, 422, "series[0].y[0]"),
    ({"series": [{"t": [0.0, 1.0], "y": [[1.0, 1.0]]}], "t": [1.0]}, 422, "series[0].y"),
    ({"series": [{"t": [0.0], "y": [[None, 1.0]]}], "t": [1.0]}, 422, "series[0].y[0]"),
    ({"series": [{"t": [1.0], "y": [[1.0, 1.0]]}], "t": [0.5, 2.0]}, 422, "t"),
    ({"series": [{"t": [0.0], "y": [[1.0, 1.0]]}], "t": [1.0], "samples": 3}, 422, "samples"),
    ({"series": [{"t": [0.0], "y": [[1.0, 1.0]]}] * 2, "t": [float(i) for i in range(1, 120)]}, 422, "series"),
])
def test_bad_forecasts_are_problems_naming_the_field(client, job_id, body, status, field):
    _problem(client.post(f"/v1/jobs/{job_id}/forecast", json=body), status, field)


def test_nan_and_a_non_time_series_job_are_refused_and_nothing_is_stored(client, job_id, settings):
    stored = sorted(p.relative_to(settings.artifact_dir) for p in settings.artifact_dir.rglob("*"))
    raw = json.dumps({"series": [{"t": [0.0], "y": [[float("nan"), 1.0]]}], "t": [1.0]})
    resp = client.post(f"/v1/jobs/{job_id}/forecast", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 422 and "series" in resp.json()["errors"][0]["field"]
    cnf = client.post("/v1/jobs", json={"model": {"type": "cnf"}, "dataset": {"name": "moons"}}).json()["id"]
    resp = client.post(f"/v1/jobs/{cnf}/forecast", json={"series": [{"t": [0.0], "y": [[1.0, 1.0]]}], "t": [1.0]})
    assert resp.status_code == 409 and "timeseries" in resp.json()["detail"]
    assert sorted(p.relative_to(settings.artifact_dir) for p in settings.artifact_dir.rglob("*")) == stored
    assert len(client.get("/v1/jobs").json()["jobs"]) == 2  # the node job and the cnf job, nothing else


def test_series_upload_trains_a_node_job_spec_and_bad_uploads_name_the_row(client):
    rows = ["series_id,t,prey,predator"]
    for s in range(4):
        rows += [f"s{s},{t * 0.5 + 0.1 * s},{1 + 0.1 * t},{'' if t == 2 else 0.5 + 0.05 * t}" for t in range(6)]
    resp = client.post("/v1/datasets?kind=series", files={"file": ("lv.csv", "\n".join(rows).encode())})
    assert resp.status_code == 201, resp.text
    assert resp.json()["shape"] == [4, 6, 2]
    series_id = resp.json()["id"]
    job = client.post("/v1/jobs", json={**SPEC, "dataset": {"name": "series_upload", "id": series_id}})
    assert job.status_code == 202, job.text
    bad = "series_id,t,y\na,0,1\na,0,2\nb,0,1\nb,1,2\n"
    body = _problem(client.post("/v1/datasets?kind=series", files={"file": ("bad.csv", bad.encode())}), 422, "file")
    assert "row 3" in body["detail"]
    points = client.post("/v1/datasets", files={"file": ("p.csv", ("\n".join(f"{i},{i * i}" for i in range(12))).encode())})
    assert points.status_code == 201
    wrong = client.post("/v1/jobs", json={**SPEC, "dataset": {"name": "series_upload", "id": points.json()["id"]}})
    _problem(wrong, 422, "dataset.id")


def test_trajectories_plot_of_a_node_job(client, job_id):
    resp = client.get(f"/v1/jobs/{job_id}/plots/trajectories.png")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png" and resp.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get(f"/v1/jobs/{job_id}/plots/density.png").status_code == 409  # a flow's plot


def test_latent_ode_forecast_draws_are_reproducible_and_do_not_depend_on_the_other_series(client, settings):
    job = _trained_job(client, settings, LATENT)
    url = f"/v1/jobs/{job}/forecast"
    plot = client.get(f"/v1/jobs/{job}/plots/trajectories.png")  # encodes each test series' fitted span
    assert plot.status_code == 200 and plot.content[:8] == b"\x89PNG\r\n\x1a\n", plot.text
    probe = {"t": [0.0, 0.3, 0.5], "y": [[None, 0.6], [1.0, 0.5], [0.9, None]]}  # no fully observed start needed
    times = [0.1, 0.5, 1.5]
    alone = client.post(url, json={"series": [probe], "t": times, "samples": 3, "seed": 11})
    assert alone.status_code == 200, alone.text
    (answer,) = alone.json()["forecasts"]
    assert np.asarray(answer["mean"]).shape == (3, 2) and np.asarray(answer["samples"]).shape == (3, 3, 2)
    others = [{"t": [s, s + 0.2], "y": [[1.5 - s, 0.4 + s], [1.0, 1.0]]} for s in (-1.0, 0.0)]
    batch = client.post(url, json={"series": [others[0], probe, others[1]], "t": times, "samples": 3, "seed": 11})
    assert batch.status_code == 200, batch.text
    inside = batch.json()["forecasts"][1]
    np.testing.assert_allclose(inside["mean"], answer["mean"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(inside["samples"], answer["samples"], rtol=1e-10, atol=1e-12)
    reseeded = client.post(url, json={"series": [probe], "t": times, "samples": 3, "seed": 12}).json()["forecasts"][0]
    assert not np.allclose(reseeded["samples"], answer["samples"])
    plain = client.post(url, json={"series": [probe], "t": times}).json()["forecasts"][0]
    assert plain["samples"] is None
    _problem(client.post(url, json={"series": [probe], "t": times, "samples": 6}), 422, "samples")  # limit 5
    _problem(client.post(url, json={"series": [probe], "t": [float(i) for i in range(1, 40)], "samples": 5}),
             422, "series")  # draws count towards max_points


def test_rnn_forecast_is_deterministic_and_refuses_samples(client, settings):
    spec = {"model": {"type": "rnn", "hidden": 4}, "dataset": {"name": "spirals", "n_samples": 10, "n_points": 6},
            "training": {"iterations": 2, "batch_size": 4}}
    url = f"/v1/jobs/{_trained_job(client, settings, spec)}/forecast"
    probe = {"t": [0.0, 0.3], "y": [[None, 0.6], [1.0, 0.5]]}
    resp = client.post(url, json={"series": [probe], "t": [0.2, 0.6, 1.0]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["nfe"] == 0 and resp.json()["forecasts"][0]["samples"] is None
    _problem(client.post(url, json={"series": [probe], "t": [1.0], "samples": 2}), 422, "samples")
    fixed = client.post("/v1/jobs", json={**LATENT, "solver": {"method": "rk4", "step_size": 0.1}})
    assert fixed.status_code == 422 and "adaptive" in fixed.text
