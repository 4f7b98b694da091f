"""Property-based fuzzing of the published OpenAPI schema with schemathesis (in-process ASGI app, the
real SQLite job store and the real Redis broker).

For every operation, examples generated from the schema (valid and invalid ones) must never produce a
5xx, and every response must be documented: its status code, content type, headers and body schema.
Bounded: a fixed number of examples per operation, derandomized so that a run is reproducible.

Not checked: "positive data acceptance" (schema-valid requests answered 2xx). The API enforces
rules the schema cannot express: a data set name must be in node_engine's registry, a classifier
needs an image data set, an id in a path must name an existing job; those requests get a documented
4xx, which is right.
"""

from __future__ import annotations

import uuid

import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from jobs.settings import Settings
from service.app import create_app

pytestmark = [pytest.mark.redis, pytest.mark.slow]

EXAMPLES_PER_OPERATION = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def _checkpoint(spec: dict) -> bytes:
    """A real checkpoint after one training step (node_engine, in-process)."""
    from node_engine.training import build_trainer
    from service.schemas import JobCreate

    trainer = build_trainer(JobCreate.model_validate(spec).model_dump(mode="json"))
    trainer.run()
    return trainer.checkpoint()


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory, redis_url, redis_client):
    """The app, and ids of real jobs to aim generated requests at: a 2-D CNF and an MLP classifier with
    checkpoints, and a queued job without one (random ids alone only ever reach the 404 path)."""
    from fastapi.testclient import TestClient

    from jobs.artifacts import LocalArtifactStore, checkpoint_prefix

    data = tmp_path_factory.mktemp("fuzz")
    queue = f"odeforge-fuzz-{uuid.uuid4().hex[:8]}"
    settings = Settings(database_url=f"sqlite:///{data / 'jobs.db'}", artifact_dir=data / "artifacts",
                        broker_url=redis_url, queue=queue, device="cpu",
                        broker_timeout_s=2.0, max_upload_bytes=64 * 1024, max_body_bytes=256 * 1024,
                        max_points=300, max_samples=300, max_predict_inputs=16,
                        ready_requires_worker=False)  # no worker here: /readyz checks the rest
    specs = {
        "cnf": {"model": {"type": "cnf", "hidden_dims": [8, 8]}, "dataset": {"name": "moons", "n_samples": 256},
                "training": {"iterations": 1, "batch_size": 32}},
        "mlp": {"model": {"type": "mlp", "hidden": 8}, "dataset": {"name": "digits", "n_samples": 200},
                "training": {"iterations": 1, "batch_size": 32}},
    }
    ids = {}
    with TestClient(create_app(settings)) as client:  # creates the schema; the fuzzed app shares the store
        artifacts = LocalArtifactStore(settings.artifact_dir)
        for kind, spec in specs.items():
            ids[kind] = client.post("/v1/jobs", json=spec).json()["id"]
            artifacts.put(f"{checkpoint_prefix(ids[kind])}/final.safetensors", _checkpoint(spec))
        ids["queued"] = client.post("/v1/jobs", json=specs["cnf"]).json()["id"]
    app = create_app(settings)
    yield schemathesis.openapi.from_asgi("/openapi.json", app), ids, settings
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()  # the app's lifespan (stores, reconciler) was started by schemathesis
    redis_client.delete(queue, f"_kombu.binding.{queue}")


def test_schema_fuzzing_finds_no_server_error_and_no_undocumented_response(fuzz_target):
    schema, ids, _ = fuzz_target
    failures: dict[str, str] = {}
    statuses: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                                 suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode),
                              # names, not the ids: Hypothesis seeds a derandomized test from the repr of
                              # its strategies, and random ids in it made every run draw other examples
                              # (a real job first: Hypothesis draws early elements most)
                              job=st.sampled_from(["cnf", "mlp", "queued", None]),
                              dataset=st.sampled_from([None, "moons", "digits", "upload"]),
                              points=st.none() | st.lists(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=2),
                                                          min_size=1, max_size=20),
                              n=st.none() | st.integers(1, 50))
            def fuzz(case, job, dataset, points, n) -> None:
                # Real ids everywhere but DELETE (it would remove the jobs the other operations aim at)
                # and the event stream (it stays open until the job ends; tests/service/test_events.py).
                job = ids[job] if job is not None else None
                if job is not None and "job_id" in (case.path_parameters or {}) and not (
                        operation.method.upper() == "DELETE" or operation.path.endswith("/events")):
                    case.path_parameters["job_id"] = job
                if dataset is not None and isinstance(case.body, dict) and isinstance(case.body.get("dataset"), dict):
                    case.body["dataset"]["name"] = dataset  # registry names the schema cannot enumerate
                if points is not None and isinstance(case.body, dict) and "points" in case.body:
                    case.body["points"] = points  # the model's dimension (2), which the schema cannot state
                if n is not None and isinstance(case.body, dict) and operation.path.endswith("/samples"):
                    case.body["n"] = n  # under ODEFORGE_MAX_SAMPLES (a setting, not in the schema)
                response = case.call_and_validate(checks=CHECKS)
                statuses.setdefault(operation.label, set()).add(response.status_code)

            try:
                fuzz()
            except BaseException as exc:  # noqa: BLE001 - collect every operation's failure, report them together
                if isinstance(exc, KeyboardInterrupt):
                    raise
                if isinstance(exc, hypothesis.errors.Unsatisfiable) and mode is GenerationMode.NEGATIVE:
                    continue  # no parameters and no body (e.g. /healthz): nothing to make invalid
                failures[f"{operation.label} ({mode.value})"] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    # The fuzzing went past validation: real models answered, jobs were accepted.
    assert 202 in statuses["POST /v1/jobs"]
    for route in ("POST /v1/jobs/{job_id}/log-density", "POST /v1/jobs/{job_id}/samples",
                  "GET /v1/jobs/{job_id}", "GET /v1/jobs/{job_id}/metrics"):
        assert 200 in statuses[route], (route, statuses[route])


# ---- numeric extremes (issue 14) -----------------------------------------------------------------
# JSON text, not Python values: 400-digit integers, 1e400 (inf once parsed), bare NaN/Infinity tokens,
# numbers as strings, deep nesting. Each is put in every numeric slot of a valid request.
EXTREMES = ["1e308", "-1.7976931348623157e308", "1.7976931348623157e308", "5e-324", "-5e-324", "-0.0", "1e400",
            "-1e400", "NaN", "Infinity", "-Infinity", '"NaN"', '"1e999"', '"-Infinity"', "9" * 400, "-" + "9" * 400,
            "9" * 5000, "2147483648", "-9223372036854775809", "18446744073709551617", "1e-400", "0", "-1", "true",
            "null", '""', "[]", "{}", "[" * 200 + "1" + "]" * 200, "[" * 5000 + "]" * 5000, "0.1e-99999"]
_IMAGE = "[" + ",".join(["[" + ",".join(["0"] * 8) + "]"] * 7 + ["[X,0,0,0,0,0,0,0]"]) + "]"
TEMPLATES = [  # (method, path, JSON body with X where the extreme goes, or None for a query)
    ("POST", "/v1/jobs/{cnf}/log-density", '{"points": [[X, 0.0]]}'),
    ("POST", "/v1/jobs/{cnf}/log-density", '{"points": [[0.5, 0.5], [X, X], [1.0, -0.5]]}'),
    ("POST", "/v1/jobs/{cnf}/log-density", '{"points": [X]}'),
    ("POST", "/v1/jobs/{cnf}/log-density", '{"points": X}'),
    ("POST", "/v1/jobs/{cnf}/samples", '{"n": X}'),
    ("POST", "/v1/jobs/{cnf}/samples", '{"n": 2, "seed": X}'),
    ("POST", "/v1/jobs/{mlp}/predict", '{"inputs": [' + _IMAGE + ']}'),
    ("POST", "/v1/jobs/{mlp}/predict", '{"inputs": [X]}'),
    ("POST", "/v1/jobs/{cnf}/forecast", '{"series": [{"t": [0.0, X], "y": [[1.0], [X]]}], "t": [X]}'),
    ("POST", "/v1/jobs", '{"model": {"type": "cnf", "hidden_dims": [X]}, "dataset": {"name": "moons"}}'),
    ("POST", "/v1/jobs", '{"model": {"type": "cnf", "end_time": X}, "dataset": {"name": "moons"}}'),
    ("POST", "/v1/jobs", '{"model": {"type": "cnf"}, "dataset": {"name": "moons", "n_samples": X, "seed": X}}'),
    ("POST", "/v1/jobs", '{"model": {"type": "cnf"}, "dataset": {"name": "moons"}, '
                         '"solver": {"rtol": X, "atol": X, "max_num_steps": X, "step_size": X}}'),
    ("POST", "/v1/jobs", '{"model": {"type": "mlp", "hidden": X}, "dataset": {"name": "digits"}, '
                         '"training": {"iterations": X, "lr": X, "batch_size": X, "epochs": X}}'),
    ("GET", "/v1/jobs?limit=X&page_token=X", None),
    ("GET", "/v1/jobs/{cnf}/metrics?since_step=X&limit=X", None),
    ("UPLOAD", "/v1/datasets", "X,0\n" + "1,2\n3,4\n5,7\n" * 5),
]


def test_numeric_extremes_in_every_slot_of_every_endpoint_give_no_server_error(fuzz_target):
    """Every extreme in every template (plus long lists): no 5xx except a documented 503 budget
    refusal, and every error is problem+json. Exhaustive over EXTREMES x TEMPLATES, hypothesis on top
    for long lists of extremes."""
    from urllib.parse import quote

    from fastapi.testclient import TestClient

    _, ids, settings = fuzz_target
    failures: list[str] = []

    def check(client, method: str, path: str, body: str | None, value: str) -> None:
        path = path.format(**ids)
        if method == "GET":
            resp = client.get(path.replace("X", quote(value, safe="")))
        elif method == "UPLOAD":
            resp = client.post(path, files={"file": ("x.csv", body.replace("X", value))})
        else:
            resp = client.post(path, content=body.replace("X", value), headers={"content-type": "application/json"})
        if resp.status_code >= 500 or (resp.status_code >= 400 and
                                       not resp.headers["content-type"].startswith("application/problem+json")):
            failures.append(f"{method} {path} X={value[:40]!r}: {resp.status_code} {resp.text[:200]}")

    with TestClient(create_app(settings)) as client:
        for method, path, body in TEMPLATES:
            for value in EXTREMES:
                check(client, method, path, body, value)

        @hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
        @hypothesis.given(values=st.lists(st.sampled_from(EXTREMES[:12]) | st.floats(allow_nan=False).map(repr),
                                          min_size=1, max_size=600))
        def long_lists(values) -> None:
            points = "[" + ",".join(f"[{v}, 0.0]" for v in values) + "]"
            check(client, "POST", "/v1/jobs/{cnf}/log-density", '{"points": X}', points)

        long_lists()
    assert not failures, "\n".join(failures[:30])
