"""Hostile and malformed input is refused with a problem+json naming the field, and changes nothing.

"Nothing" is checked where it would show: the job store (``GET /v1/jobs``), the broker's queue
(read from Redis itself) and the artifact directory. Bounds are taken from the published OpenAPI
schema, which is first checked to bound every number, list and string of the job spec; then a value
just past every bound is sent and must come back as a 422 naming that field.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from jobs.artifacts import LocalArtifactStore, checkpoint_prefix
from service.app import create_app
from tests.reliability.test_leases import messages

pytestmark = pytest.mark.redis

TINY = {"model": {"type": "cnf", "hidden_dims": [8, 8]}, "dataset": {"name": "moons", "n_samples": 256},
        "training": {"iterations": 1, "batch_size": 32}}
SPEC_MODELS = ("CNFModel", "PlanarModel", "ODENetModel", "ResNetModel", "MLPModel", "DatasetSpec", "SolverSpec",
               "TrainingSpec")


@pytest.fixture(scope="module")
def checkpoint() -> bytes:
    """A real checkpoint of a 2-D CNF after one training step (node_engine, in-process)."""
    from node_engine.training import build_trainer
    from service.schemas import JobCreate

    trainer = build_trainer(JobCreate.model_validate(TINY).model_dump(mode="json"))
    trainer.run()
    return trainer.checkpoint()


@pytest.fixture
def settings(make_settings):
    return make_settings(max_points=50, max_upload_bytes=64 * 1024, max_body_bytes=256 * 1024)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def assert_problem(resp, status: int, field: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["detail"] and body["title"]
    if field is not None:
        assert field in [e["field"] for e in body.get("errors") or []], body
    return body


def assert_nothing_created(client, redis_client, queue_name, jobs_before: int = 0) -> None:
    assert len(client.get("/v1/jobs").json()["jobs"]) == jobs_before
    assert len(messages(redis_client, queue_name)) == jobs_before


# ---- every spec field is bounded -----------------------------------------------------------------
def _schemas() -> dict:
    from jobs.settings import Settings

    return create_app(Settings()).openapi()["components"]["schemas"]


def _numeric_bounds(prop: dict) -> dict | None:
    """The numeric branch of a property (``anyOf [number, null]`` included), or None."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") in ("integer", "number"):
            return branch
    return None


def test_the_published_schema_bounds_every_spec_field():
    schemas = _schemas()
    unbounded = []
    for name in SPEC_MODELS:
        assert schemas[name].get("additionalProperties") is False, f"{name} accepts unknown fields"
        for field, prop in schemas[name]["properties"].items():
            branches = prop.get("anyOf", [prop])
            for b in branches:
                kind = b.get("type")
                if kind in ("integer", "number"):
                    if not ({"minimum", "exclusiveMinimum"} & b.keys() and {"maximum", "exclusiveMaximum"} & b.keys()):
                        unbounded.append(f"{name}.{field}")
                elif kind == "array":
                    items = b["items"]
                    if "maxItems" not in b or not ({"maximum", "exclusiveMaximum"} & items.keys()):
                        unbounded.append(f"{name}.{field}")
                elif kind == "string":
                    if not ({"maxLength", "enum", "const", "pattern"} & b.keys()):
                        unbounded.append(f"{name}.{field}")
    assert unbounded == []


def _body_with(schema_name: str, field: str, value) -> tuple[dict, str]:
    """A valid minimal body with one field replaced; and the field name the 422 must give."""
    body = json.loads(json.dumps(TINY))
    section = {"DatasetSpec": "dataset", "SolverSpec": "solver", "TrainingSpec": "training"}.get(schema_name)
    if section is None:  # a model variant
        model_type = {"CNFModel": "cnf", "PlanarModel": "planar", "ODENetModel": "odenet", "ResNetModel": "resnet",
                      "MLPModel": "mlp"}[schema_name]
        body["model"] = {"type": model_type}
        if model_type not in ("cnf", "planar"):
            body["dataset"] = {"name": "digits"}
        section = "model"
    body.setdefault(section, {})[field] = value
    return body, f"{section}.{field}"


def _out_of_bounds_cases() -> list:
    cases = []
    for name in SPEC_MODELS:
        for field, prop in _schemas()[name]["properties"].items():
            b = _numeric_bounds(prop)
            if b is not None:
                step = 1 if b["type"] == "integer" else 0
                if "minimum" in b:
                    cases.append((name, field, b["minimum"] - (step or abs(b["minimum"]) * 1e-6 or 1e-300)))
                if "exclusiveMinimum" in b:
                    cases.append((name, field, b["exclusiveMinimum"]))
                if "maximum" in b:
                    cases.append((name, field, b["maximum"] + (step or abs(b["maximum"]) * 1e-6 or 1e-300)))
                if "exclusiveMaximum" in b:
                    cases.append((name, field, b["exclusiveMaximum"]))
                if b["type"] == "integer":
                    cases.append((name, field, 2.5))
                cases.append((name, field, "ten"))
            elif prop.get("type") == "array":
                cases.append((name, field, [prop["items"]["maximum"] + 1]))
                cases.append((name, field, [1] * (prop["maxItems"] + 1)))
                cases.append((name, field, []))
            elif "enum" in prop and field != "type":  # "type" picks the model: an unknown one names "model"
                cases.append((name, field, "no-such-" + field))
    return cases


def test_every_value_past_a_bound_is_422_naming_the_field(client, redis_client, queue_name):
    cases = _out_of_bounds_cases()
    assert len(cases) > 100
    wrong = []
    for schema_name, field, value in cases:  # one app for all cases: ~150 requests
        body, name = _body_with(schema_name, field, value)
        resp = client.post("/v1/jobs", json=body)
        fields = [e["field"] for e in resp.json().get("errors") or []] if resp.status_code == 422 else []
        if not (resp.headers["content-type"].startswith("application/problem+json")
                and any(f == name or f.startswith(name + "[") for f in fields)):
            wrong.append((name, value, resp.status_code, resp.text[:200]))
    assert wrong == []
    assert_nothing_created(client, redis_client, queue_name)


@pytest.mark.parametrize("body, field", [
    ({**TINY, "solver": {"rtol": 1.0}}, "solver.rtol"),  # tolerances live in (0, 1)
    ({**TINY, "solver": {"atol": 0}}, "solver.atol"),
    ({**TINY, "solver": {"eval_rtol": -1e-6}}, "solver.eval_rtol"),
    ({**TINY, "solver": {"rtol": "1e-5; DROP TABLE jobs"}}, "solver.rtol"),
    ({**TINY, "dataset": {"name": "../../etc/passwd"}}, "dataset.name"),
    ({**TINY, "dataset": {"name": "moons", "path": "/etc/passwd"}}, "dataset.path"),  # server-side only
    ({**TINY, "dataset": {"name": "upload", "id": "../../jobs.db"}}, "dataset.id"),
    ({**TINY, "model": {"type": "cnf", "hiden_dims": [8]}}, "model.hiden_dims"),
    ({**TINY, "model": {"type": "CNF"}}, "model"),
    ({**TINY, "solver": {"method": "dopri5", "options": {"x": 1}}}, "solver.options"),
    ({**TINY, "priority": 10}, "priority"),
    ({"model": {"type": "cnf"}}, "dataset"),
])
def test_unknown_fields_and_names_are_422_naming_the_field(client, redis_client, queue_name, body, field):
    assert_problem(client.post("/v1/jobs", json=body), 422, field)
    assert_nothing_created(client, redis_client, queue_name)


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b'"job"', b'{"model": {"type": "cnf"}, "dataset": 7}',
                                 b"\xff\xfe\x00", b'{"model": ' * 5000])
def test_malformed_json_is_a_client_error_not_500(client, redis_client, queue_name, raw):
    resp = client.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code in (400, 422)  # 400: not even JSON text (not UTF-8, nested too deep)
    assert_problem(resp, resp.status_code)
    assert_nothing_created(client, redis_client, queue_name)


# ---- body size limit ---------------------------------------------------------------------------
def test_body_size_limit_applies_to_declared_and_streamed_bodies(client, settings, redis_client, queue_name):
    padding = {"training": {"iterations": 1, "note": "x" * (settings.max_body_bytes + 1)}}
    body = json.dumps({**TINY, **padding}).encode()
    declared = assert_problem(client.post("/v1/jobs", content=body, headers={"content-type": "application/json"}), 413,
                              field="body")

    def chunks():  # no Content-Length: Transfer-Encoding chunked, counted as it arrives
        for i in range(0, len(body), 16 * 1024):
            yield body[i:i + 16 * 1024]

    resp = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    streamed = assert_problem(resp, 413, field="body")
    # one problem either way, however far the body got before it was refused
    assert streamed["type"] == declared["type"] == "https://odeforge.dev/problems/body-too-large"
    assert streamed["title"] == declared["title"] and streamed["errors"] == declared["errors"]
    big_upload = b"1.0,2.0\n" * (settings.max_body_bytes // 8 + 10)
    resp = client.post("/v1/datasets", files={"file": ("big.csv", big_upload)})
    assert_problem(resp, 413)
    assert_nothing_created(client, redis_client, queue_name)
    assert not (settings.artifact_dir / "datasets").exists()
    # A streamed body under the limit is fine.
    small = json.dumps(TINY).encode()
    assert client.post("/v1/jobs", content=iter([small[:10], small[10:]]),
                       headers={"content-type": "application/json"}).status_code == 202


# ---- log-density points ------------------------------------------------------------------------
@pytest.fixture
def trained(client, settings, checkpoint) -> str:
    job_id = client.post("/v1/jobs", json=TINY).json()["id"]
    LocalArtifactStore(settings.artifact_dir).put(f"{checkpoint_prefix(job_id)}/step-000001.safetensors", checkpoint)
    return job_id


@pytest.mark.parametrize("raw, field", [
    ('{"points": [[0.0, 1.0, 2.0]]}', "points[0]"),  # wrong dimension (the model is 2-D)
    ('{"points": [[0.0, 1.0], [0.0]]}', "points[1]"),  # ragged
    ('{"points": [[0.0, NaN]]}', "points[0][1]"),
    ('{"points": [[Infinity, 0.0]]}', "points[0][0]"),
    ('{"points": [[1e999, 0.0]]}', "points[0][0]"),  # overflows to inf
    ('{"points": [[0.0, "1"]], "x": 1}', "x"),
    ('{"points": [["a", 0.0]]}', "points[0][0]"),
    ('{"points": []}', "points"),
    ('{"points": [0.0, 1.0]}', "points[0]"),
    ('{"points": ' + json.dumps([[0.0, 0.0]] * 51) + "}", "points"),  # over ODEFORGE_MAX_POINTS
    ('{"pts": [[0.0, 0.0]]}', "points"),
])
def test_log_density_points_are_validated(client, trained, raw, field):
    resp = client.post(f"/v1/jobs/{trained}/log-density", content=raw, headers={"content-type": "application/json"})
    assert_problem(resp, 422, field)


def test_valid_points_still_answer(client, trained):
    resp = client.post(f"/v1/jobs/{trained}/log-density", json={"points": [[0.0, 0.0], [1.0, -0.5]]})
    assert resp.status_code == 200, resp.text
    assert all(math.isfinite(v) for v in resp.json()["log_density"])


# ---- uploaded data sets ------------------------------------------------------------------------
def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


@pytest.mark.parametrize("name, content", [
    ("empty.npy", b""),
    ("empty.csv", b""),
    ("truncated.npy", _npy(np.ones((50, 2)))[:-40]),
    ("header-lies.npy", _npy(np.ones((50, 2))).replace(b"(50, 2)", b"(90, 2)")),
    ("inf.npy", _npy(np.array([[1.0, np.inf]] + [[float(i), 1.0 + i] for i in range(20)]))),
    ("nan.npy", _npy(np.array([[np.nan, 1.0]] + [[float(i), 1.0 + i] for i in range(20)]))),
    ("scalar.npy", _npy(np.float64(3.0))),
    ("wide.npy", _npy(np.random.default_rng(0).normal(size=(20, 257)))),  # more columns than a model may have
    ("complex.npy", _npy(np.ones((20, 2), dtype=complex))),
    ("strings.npy", _npy(np.array([["a", "b"]] * 20))),
    ("constant.csv", b"1.0,2.0\n" * 20),
    ("ragged.csv", b"1,2\n3,4,5\n" * 10),
    ("pickle.npy", pickle.dumps({"a": 1})),
    ("archive.npz", b"PK\x03\x04"),
    ("noext", b"1,2\n" * 20),
])
def test_bad_uploads_are_refused_and_store_nothing(client, settings, name, content):
    assert_problem(client.post("/v1/datasets", files={"file": (name, content)}), 422, "file")
    stored = settings.artifact_dir / "datasets"
    assert not stored.exists() or not any(stored.iterdir())


def test_a_pickled_npy_is_never_unpickled(client, settings, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    payload = _npy(np.array([Exploit()] * 20, dtype=object), allow_pickle=True)
    assert_problem(client.post("/v1/datasets", files={"file": ("evil.npy", payload)}), 422, "file")
    assert not marker.exists()


# ---- checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [
    "..%2F..%2Fjobs.db", "..%2Fstep-000001.safetensors", "%2Fetc%2Fpasswd", ".safetensors",
    "step-000001.safetensors%00.txt", "step-000001.safetensors%2F..", "..%5C..%5Cjobs.db",
    "%2E%2E%2F%2E%2E%2Fjobs.db", "a" * 300 + ".safetensors",
])
def test_checkpoint_names_cannot_escape_the_artifact_directory(client, settings, trained, name):
    resp = client.get(f"/v1/jobs/{trained}/checkpoints/{name}")
    assert resp.status_code == 404, (name, resp.status_code, resp.content[:100])
    assert resp.headers["content-type"].startswith("application/problem+json")


def test_tampered_or_foreign_checkpoints_give_a_clear_error_and_are_never_unpickled(client, settings, checkpoint,
                                                                                    tmp_path):
    artifacts = LocalArtifactStore(settings.artifact_dir)
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    flipped = bytearray(checkpoint)
    flipped[-5] ^= 0xFF  # one byte of tensor data
    cases = {
        "garbage": b"\x00" * 64,
        "pickle": pickle.dumps(Exploit()),
        "tampered": bytes(flipped),
        "truncated": checkpoint[: len(checkpoint) // 2],
    }
    for what, data in cases.items():
        job_id = client.post("/v1/jobs", json=TINY).json()["id"]
        artifacts.put(f"{checkpoint_prefix(job_id)}/final.safetensors", data)
        body = assert_problem(client.post(f"/v1/jobs/{job_id}/log-density", json={"points": [[0.0, 0.0]]}), 409)
        assert body["type"].endswith("checkpoint-invalid"), (what, body)
        if what == "tampered":
            assert "modified or corrupted" in body["detail"]
        assert_problem(client.post(f"/v1/jobs/{job_id}/samples", json={"n": 2}), 409)
    assert not marker.exists()


# ---- found by review: inputs that once reached SQL or float32 unchecked -----------------------------
def test_fixed_grid_cnf_without_step_size_is_refused_at_submit(client, redis_client, queue_name):
    body = assert_problem(client.post("/v1/jobs", json={**TINY, "solver": {"method": "rk4"}}), 422)
    assert "solver.step_size" in body["detail"]
    assert_nothing_created(client, redis_client, queue_name)
    # with a step size it is a valid job
    assert client.post("/v1/jobs", json={**TINY, "solver": {"method": "rk4", "step_size": 0.1}}).status_code == 202


def test_cursors_beyond_64_bit_are_422_not_500(client, trained):
    import base64

    assert_problem(client.get(f"/v1/jobs/{trained}/metrics", params={"since_step": 10**20}), 422, "since_step")
    for cursor in (b"jobs:100000000000000000000000", b"jobs:-5"):
        token = base64.urlsafe_b64encode(cursor).decode()
        assert_problem(client.get("/v1/jobs", params={"page_token": token}), 422, "page_token")


def test_predict_refuses_pixels_that_overflow_the_model(client, settings):
    from node_engine.training import build_trainer
    from service.schemas import JobCreate

    spec = {"model": {"type": "mlp", "hidden": 8}, "dataset": {"name": "digits", "n_samples": 100},
            "training": {"iterations": 1, "batch_size": 16}}
    trainer = build_trainer(JobCreate.model_validate(spec).model_dump(mode="json"))
    trainer.run()
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    LocalArtifactStore(settings.artifact_dir).put(f"{checkpoint_prefix(job_id)}/step-000001.safetensors",
                                                  trainer.checkpoint())
    image = [[0.0] * 8 for _ in range(8)]
    ok = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": [image]})
    assert ok.status_code == 200 and abs(sum(ok.json()["probabilities"][0]) - 1.0) < 1e-5
    image[3][4] = 1e300  # finite in JSON, inf once the model casts to float32
    assert_problem(client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": [image]}), 422, "inputs")


# ---- issue 14: hostile numbers ------------------------------------------------------------------
def test_a_point_whose_log_density_underflows_is_null_with_a_reason_and_the_rest_is_answered(client, trained,
                                                                                                checkpoint):
    from node_engine.inference import load_model

    points = [[0.0, 0.0], [1e200, 0.0], [1.0, -0.5]]
    resp = client.post(f"/v1/jobs/{trained}/log-density", json={"points": points})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    # The reference: the same model in-process, each point alone (1e200 standardized squares past float64).
    model = load_model(checkpoint)
    alone = [model.log_density_rows(np.array([p]))[0][0] for p in points]
    assert alone[1] == -math.inf and math.isfinite(alone[0]) and math.isfinite(alone[2])
    assert body["log_density"][1] is None
    np.testing.assert_allclose([body["log_density"][0], body["log_density"][2]], [alone[0], alone[2]], rtol=1e-9)
    assert [f["index"] for f in body["failed"]] == [1] and body["failed"][0]["reason"].startswith("underflow")
    clean = client.post(f"/v1/jobs/{trained}/log-density", json={"points": [[0.0, 0.0]]}).json()
    assert clean["failed"] == []


def test_coordinates_that_overflow_the_model_are_422_naming_point_and_coordinate(client, trained):
    resp = client.post(f"/v1/jobs/{trained}/log-density", json={"points": [[0.0, 0.0], [0.0, 1.7e308]]})
    body = assert_problem(resp, 422, "points[1][1]")
    assert "overflows" in body["detail"]


@pytest.mark.parametrize("digits", [400, 4000])
def test_a_400_digit_integer_is_422_not_500(client, trained, digits):
    huge = "9" * digits
    resp = client.post(f"/v1/jobs/{trained}/log-density", content='{"points": [[0.0, %s]]}' % huge,
                       headers={"content-type": "application/json"})
    assert resp.status_code in (400, 422) and resp.status_code < 500
    assert_problem(resp, resp.status_code)


def test_predict_with_a_400_digit_integer_is_422_naming_the_index(client, settings):
    from node_engine.training import build_trainer
    from service.schemas import JobCreate

    spec = {"model": {"type": "mlp", "hidden": 8}, "dataset": {"name": "digits", "n_samples": 100},
            "training": {"iterations": 1, "batch_size": 16}}
    trainer = build_trainer(JobCreate.model_validate(spec).model_dump(mode="json"))
    trainer.run()
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    LocalArtifactStore(settings.artifact_dir).put(f"{checkpoint_prefix(job_id)}/step-000001.safetensors",
                                                  trainer.checkpoint())
    rows = ",".join("[" + ",".join("0" for _ in range(8)) + "]" for _ in range(8))
    raw = '{"inputs": [[%s]]}' % rows.replace("[0,0,0", "[0,0," + "9" * 400, 1)
    assert_problem(client.post(f"/v1/jobs/{job_id}/predict", content=raw, headers={"content-type": "application/json"}),
                   422, "inputs[0][0][2]")


def _npy_with_header(header: str, data: bytes) -> bytes:
    header = header + " " * (-(len(header) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + data


@pytest.mark.parametrize("content, says", [
    # 10^12 rows over 160 bytes: refused from the header, nothing allocated
    (_npy_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000, 2), }", b"\0" * 160),
     "declares shape (1000000000000, 2)"),
    (_npy_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (10, 2), }", b"\0" * 161), "161 bytes"),
    (b"\x93NUMPY\x01\x00\x14\x00{garbage           \n", "malformed .npy header"),
    (_npy_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (-5, 2), }", b""), ".npy"),
    (_npy_with_header("{'descr': 'O', 'fortran_order': False, 'shape': (10, 2), }", b"\0" * 160), "object"),
    (_npy_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (10, 2), 'extra': 1}", b"\0" * 160),
     "malformed"),
    (b"\x93NUMPY\x03\x00\x14\x00", "malformed .npy header"),  # unknown version, truncated
])
def test_npy_headers_are_checked_against_the_file_before_anything_is_allocated(client, settings, content, says):
    body = assert_problem(client.post("/v1/datasets", files={"file": ("hostile.npy", content)}), 422, "file")
    assert says in body["detail"], body["detail"]
    stored = settings.artifact_dir / "datasets"
    assert not stored.exists() or not any(stored.iterdir())


def test_npz_members_are_checked_like_npy_files(client, settings):
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("t.npy", _npy_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': "
                                                   "(1000000, 1000000), }", b"\0" * 160))
        archive.writestr("y.npy", _npy(np.zeros((2, 3, 1))))
    body = assert_problem(client.post("/v1/datasets", params={"kind": "series"},
                                      files={"file": ("hostile.npz", buf.getvalue())}), 422, "file")
    assert "member 't'" in body["detail"] and "declares shape" in body["detail"], body["detail"]


def test_json_bodies_have_a_tighter_limit_than_uploads(make_settings, redis_client, queue_name):
    settings = make_settings(max_json_bytes=64 * 1024, max_upload_bytes=200 * 1024, max_body_bytes=256 * 1024)
    with TestClient(create_app(settings)) as c:
        body = json.dumps({**TINY, "training": {"iterations": 1, "note": "x" * 70_000}}).encode()
        refused = assert_problem(c.post("/v1/jobs", content=body, headers={"content-type": "application/json"}),
                                 413, "body")
        assert "ODEFORGE_MAX_JSON_BYTES" in refused["detail"] and str(64 * 1024) in refused["detail"]
        streamed = c.post("/v1/jobs", content=iter([body[:30_000], body[30_000:]]),
                          headers={"content-type": "application/json"})
        assert assert_problem(streamed, 413, "body")["errors"] == refused["errors"]
        rows = np.random.default_rng(0).normal(size=(4000, 2))  # ~100 KB of CSV: over the JSON limit, an upload
        csv = "\n".join(f"{a:.15f},{b:.15f}" for a, b in rows).encode()
        assert len(csv) > 64 * 1024
        assert c.post("/v1/datasets", files={"file": ("big.csv", csv)}).status_code == 201
    assert messages(redis_client, queue_name) == []  # the refused submissions published nothing


def test_a_large_json_body_is_parsed_and_validated_like_a_small_one(client, trained):
    # over JSON_OFF_LOOP_BYTES: parsed on a worker thread, same answers and same field-level errors
    from service.limits import JSON_OFF_LOOP_BYTES

    pad = [[0.0, 0.0]] * 12_000
    raw = json.dumps({"points": pad + [[0.0, "NaN"]]})
    assert JSON_OFF_LOOP_BYTES < len(raw) < 256 * 1024
    assert_problem(client.post(f"/v1/jobs/{trained}/log-density", content=raw,
                               headers={"content-type": "application/json"}), 422, "points[12000][1]")
    assert_problem(client.post(f"/v1/jobs/{trained}/log-density", json={"points": pad}), 422, "points")  # > 50
