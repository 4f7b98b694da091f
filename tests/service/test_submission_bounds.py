"""Submissions refused for what they would cost (issue 14): tolerances the job's dtype cannot honour
and an estimated cost above the deployment's budget are 422 problem+json naming the field and the
limit, before anything is stored or queued; the project's example specs pass."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app

pytestmark = pytest.mark.redis

MOONS = {"model": {"type": "cnf", "hidden_dims": [32, 32]}, "dataset": {"name": "moons"}}


def problem(resp, slug: str) -> dict:
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["type"].endswith("/" + slug), body
    return body


def test_tolerances_below_the_dtypes_precision_are_refused_naming_the_field(make_settings):
    with TestClient(create_app(make_settings())) as client:
        body = problem(client.post("/v1/jobs", json={**MOONS, "solver": {"rtol": 1e-7}}), "invalid-request")
        assert [e["field"] for e in body["errors"]] == ["solver.rtol"]
        assert "float32" in body["errors"][0]["reason"]
        body = problem(client.post("/v1/jobs", json={**MOONS, "solver": {"eval_rtol": 1e-15}}), "invalid-request")
        assert [e["field"] for e in body["errors"]] == ["solver.eval_rtol"] and "float64" in body["detail"]
        # what the dtypes can honour is accepted (the default rtol; eval_rtol 1e-13 for float64 answers)
        assert client.post("/v1/jobs", json={**MOONS, "solver": {"rtol": 1e-5, "eval_rtol": 1e-13}}).status_code == 202
        assert len(client.get("/v1/jobs").json()["jobs"]) == 1  # the refused ones left nothing


def test_a_job_above_the_cost_budget_is_refused_naming_limit_and_estimate(make_settings):
    with TestClient(create_app(make_settings(max_job_cost=1e12))) as client:
        small = {**MOONS, "training": {"iterations": 10, "batch_size": 64}}
        assert client.post("/v1/jobs", json=small).status_code == 202
        big = {**MOONS, "training": {"iterations": 100_000, "batch_size": 4096}}
        body = problem(client.post("/v1/jobs", json=big), "job-too-costly")
        assert body["errors"][0]["field"] == "spec"
        assert "ODEFORGE_MAX_JOB_COST=1e+12" in body["detail"] and "estimated cost" in body["detail"]
        assert len(client.get("/v1/jobs").json()["jobs"]) == 1


def test_the_default_budget_admits_the_readme_examples_and_refuses_the_maximum_spec(make_settings):
    with TestClient(create_app(make_settings())) as client:
        for spec in ({"model": {"type": "cnf"}, "dataset": {"name": "moons"}},
                     {**MOONS, "training": {"iterations": 300}},
                     {"model": {"type": "mlp"}, "dataset": {"name": "digits"}, "training": {"epochs": 5}},
                     {"model": {"type": "node", "hidden_dims": [64, 64]}, "dataset": {"name": "lotka_volterra",
                      "n_samples": 200}, "solver": {"rtol": 1e-3, "atol": 1e-4, "adjoint": False},
                      "training": {"iterations": 300, "lr": 0.01}}):
            assert client.post("/v1/jobs", json=spec).status_code == 202, spec
        worst = {"model": {"type": "cnf", "hidden_dims": [1024] * 8, "num_blocks": 4},
                 "dataset": {"name": "moons", "n_samples": 1_000_000},
                 "training": {"iterations": 1_000_000, "batch_size": 65536}}
        problem(client.post("/v1/jobs", json=worst), "job-too-costly")
