"""``odeforge.Client`` and the ``odeforge`` CLI built on it, against the real API over HTTP.

The app (``service.app.create_app``: SQLite job store, the real Redis broker, local artifacts) runs in
uvicorn on a free port in this process; no worker runs, so jobs stay queued, and a checkpoint, when
a test needs one, is an untrained model written by node_engine into the artifact store, whose
log-densities the test computes itself from the same bytes. Tests using the ``api``/``serve``
fixtures are marked ``services``/``redis`` by tests/conftest.py (through ``make_settings``); the
parser, resumption, refused-connection and import tests need no server and run in the fast tier.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

import odeforge
from odeforge import sse
from service.cli import app as cli_app
from tests.conftest import REPO


TINY = {"model": {"type": "cnf", "hidden_dims": [8, 8]}, "dataset": {"name": "moons", "n_samples": 256},
        "training": {"iterations": 3}}
ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-fedcba9876543210"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve(make_settings) -> Iterator[Callable[..., tuple[str, object]]]:
    """``serve(**settings)`` -> (base URL, settings): the real API in uvicorn on a free port."""
    import uvicorn

    from service.app import create_app

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides):
        settings = make_settings(**overrides)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}", settings

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def api(serve) -> tuple[str, object]:
    return serve()


# ---- the client -----------------------------------------------------------------------------------
def test_list_follows_pages_and_filters(api):
    url, _ = api
    with odeforge.Client(url) as c:
        ids = [c.submit(TINY)["id"] for _ in range(5)]
        c.cancel(ids[1])
        # 2 per page: 5 jobs need 3 requests, newest first
        assert [j["id"] for j in c.list(page_size=2)] == ids[::-1]
        assert [j["id"] for j in c.list(page_size=2, limit=3)] == ids[::-1][:3]
        assert [j["id"] for j in c.list(status="cancelled")] == [ids[1]]
        assert [j["id"] for j in c.list(status="queued", page_size=1)] == [i for i in ids[::-1] if i != ids[1]]


def test_problem_details_are_raised_with_their_fields(api):
    url, _ = api
    with odeforge.Client(url) as c:
        with pytest.raises(odeforge.ProblemError) as info:
            c.submit({**TINY, "solver": {"rtol": 0.0}, "training": {"iterations": 0}})
        err = info.value
        assert err.status == 422 and err.slug == "invalid-request"
        assert {e["field"] for e in err.errors} == {"solver.rtol", "training.iterations"}
        assert err.problem["status"] == 422 and "solver.rtol" in str(err) and "\n" not in str(err)

        with pytest.raises(odeforge.ProblemError) as info:
            c.get("f" * 32)
        assert info.value.status == 404 and str(info.value).startswith("404 job not found: ")
        with pytest.raises(odeforge.ProblemError) as info:
            c.get("../datasets")  # an id stays in its path segment: not GET /v1/datasets (a 200 listing)
        assert info.value.status == 404



def test_api_keys_wrong_key_is_401_and_another_owners_job_is_404(serve):
    url, _ = serve(api_keys=f"alice:{ALICE},bob:{BOB}")
    with odeforge.Client(url, api_key=ALICE) as alice, odeforge.Client(url, api_key=BOB) as bob:
        job = alice.submit(TINY)
        with pytest.raises(odeforge.ProblemError) as info:
            bob.get(job["id"])
        assert info.value.status == 404  # the same answer as for an id that does not exist
        assert list(bob.list()) == [] and [j["id"] for j in alice.list()] == [job["id"]]
        for key in ("wrong-key-0000000000000000", ""):
            with odeforge.Client(url, api_key=key) as c, pytest.raises(odeforge.ProblemError) as info:
                c.get(job["id"])
            assert info.value.status == 401 and info.value.slug == "unauthorized"


def test_api_key_from_the_environment(serve, monkeypatch):
    url, _ = serve(api_keys=f"alice:{ALICE}")
    monkeypatch.setenv("ODEFORGE_API_KEY", ALICE)
    monkeypatch.setenv("ODEFORGE_URL", url)
    with odeforge.Client() as c:
        assert c.url == url and c.submit(TINY)["status"] == "queued"


def test_upload_round_trip_bytes_path_and_refusal(api, tmp_path):
    url, settings = api
    points = np.random.default_rng(0).normal(size=(40, 3))
    buf = io.BytesIO()
    np.save(buf, points)
    csv = tmp_path / "points.csv"
    np.savetxt(csv, points[:25], delimiter=",")
    with odeforge.Client(url) as c:
        up = c.upload(buf.getvalue())  # bytes: the name (.npy) comes from the content
        assert up["shape"] == [40, 3]
        assert c.upload(csv)["shape"] == [25, 3]
        job = c.submit({**TINY, "dataset": {"name": "upload", "id": up["id"]}})
        assert job["spec"]["dataset"]["id"] == up["id"]
        stored = (Path(settings.artifact_dir) / "datasets" / f"{up['id']}.npy").read_bytes()
        # float64 uploads are stored as float32 unless ?dtype=float64 (issue 14)
        np.testing.assert_array_equal(np.load(io.BytesIO(stored)), points.astype(np.float32))
        with pytest.raises(odeforge.ProblemError) as info:
            c.upload(b"1,2\n1,3\n", filename="flat.csv")  # too few rows, constant column
        assert info.value.status == 422 and [e["field"] for e in info.value.errors] == ["file"]


def test_checkpoint_download_metrics_and_inference(api, tmp_path):
    """An untrained CNF checkpoint in the job's artifacts: downloaded whole; its log-densities through
    the client equal node_engine's on the same bytes, computed here."""
    from jobs.artifacts import LocalArtifactStore, checkpoint_key
    from node_engine.inference import load_model
    from node_engine.training import build_trainer

    url, settings = api
    with odeforge.Client(url) as c:
        job = c.submit(TINY)
        assert c.checkpoints(job["id"]) == [] and c.metrics(job["id"]) == []
        with pytest.raises(odeforge.OdeforgeError, match="no checkpoint yet"):
            c.download_checkpoint(job["id"])
        data = build_trainer(job["spec"]).checkpoint()
        artifacts = LocalArtifactStore(settings.artifact_dir)
        artifacts.put(checkpoint_key(job["id"], "step-000002.safetensors"), b"older")
        artifacts.put(checkpoint_key(job["id"], "final.safetensors"), data)
        assert c.download_checkpoint(job["id"]) == data  # final, not the step checkpoint
        path = c.download_checkpoint(job["id"], "step-000002.safetensors", tmp_path / "ck" / "s2.safetensors")
        assert path.read_bytes() == b"older"

        points = np.array([[0.0, 0.0], [1.0, -0.5], [-1.0, 1.5]])
        got = c.log_density(job["id"], points)  # a NumPy array is sent as lists
        want, _ = load_model(data).log_density(points)
        np.testing.assert_allclose(got["log_density"], want, rtol=1e-6, atol=1e-9)
        assert got["checkpoint"] == "final.safetensors"
        tuned = c.submit(TINY, init_from=job["id"])  # a job id: its newest checkpoint, named in the stored spec
        assert tuned["spec"]["init_from"] == {"job": job["id"], "checkpoint": "final.safetensors"}
        assert len(c.samples(job["id"], n=4, seed=1)["samples"]) == 4
        with pytest.raises(odeforge.ProblemError) as info:
            c.log_density(job["id"], [[0.0, 0.0, 0.0]])
        assert info.value.status == 422 and info.value.errors[0]["field"] == "points[0]"
        with pytest.raises(odeforge.ProblemError) as info:
            c.predict(job["id"], [[[0.0]]])
        assert info.value.status == 409 and info.value.slug == "wrong-model-type"


def test_refused_connection_is_a_connection_error_naming_the_url():
    url = f"http://127.0.0.1:{_free_port()}"
    with odeforge.Client(url) as c, pytest.raises(ConnectionError) as info:
        c.get("0" * 32)
    assert isinstance(info.value, odeforge.ServiceUnreachable)
    assert str(info.value) == f"cannot connect to {url} (connection refused)"


def test_spec_objects_are_accepted(api):
    from node_engine.specs import CNFSection, DatasetSection, TrainingSection
    from service.schemas import JobCreate

    url, _ = api
    with odeforge.Client(url) as c:
        job = c.submit({"model": {"type": "cnf", **CNFSection(hidden_dims=(8, 8)).to_json()},
                        "dataset": DatasetSection(name="moons", n_samples=256),
                        "training": TrainingSection(iterations=3)})
        assert job["spec"]["model"]["hidden_dims"] == [8, 8] and job["spec"]["training"]["iterations"] == 3
        typed = c.submit(JobCreate.model_validate(TINY))
        assert typed["spec"] == c.submit(TINY)["spec"]
        with pytest.raises(ValueError, match="type"):
            c.submit({"model": CNFSection(), "dataset": {"name": "moons"}})


# ---- the event stream parser and resumption --------------------------------------------------------
def test_sse_parser_follows_the_specification():
    state = sse.StreamState()
    lines = [": heartbeat", "retry: 250", "id: 1", "event: status", 'data: {"status": "running"}', "",
             "data: line one", "data:line two", "", "id: 7", "event: metric", "", "id", "data: x", "",
             "data: unfinished"]
    events = list(sse.parse(lines, state))
    assert events == [sse.Event("status", {"status": "running"}, "1"), sse.Event("message", "line one\nline two", "1"),
                      sse.Event("message", "x", "")]  # an event without data is not dispatched; "id" resets it
    assert state.retry_ms == 250 and state.last_event_id == ""


def test_events_resume_with_last_event_id_after_a_dropped_connection():
    """A server that drops the connection after each event: the client reconnects with Last-Event-ID
    and gets every event once, in order, until the terminal status."""
    import httpx

    events = [("1", "status", {"status": "running"}), ("2", "metric", {"step": 1, "loss": 2.0}),
              ("3", "metric", {"step": 2, "loss": 1.5}), ("4", "status", {"status": "succeeded"})]
    seen_headers = []

    def handler(request: httpx.Request) -> httpx.Response:
        last = request.headers.get("last-event-id")
        seen_headers.append(last)
        start = 0 if last is None else [e[0] for e in events].index(last) + 1
        eid, kind, data = events[start]

        def body():
            yield f"retry: 1\nid: {eid}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()
            if start + 1 < len(events):
                raise httpx.ReadError("connection reset")

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Stream(body()))

    with odeforge.Client("http://test", transport=httpx.MockTransport(handler)) as c:
        got = [(e.id, e.event, e.data) for e in c.events("j" * 32)]
    assert got == events
    assert seen_headers == [None, "1", "2", "3"]


class _Stream(httpx.SyncByteStream):
    """An httpx response body from a generator (which may raise mid-body, like a dropped socket)."""

    def __init__(self, gen):
        self.gen = gen

    def __iter__(self):
        yield from self.gen


# ---- the CLI ------------------------------------------------------------------------------------------
def test_cli_refused_connection_is_one_line_and_exit_1(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODEFORGE_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "service.cli", "list", "--url", url], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == f"error: cannot connect to {url} (connection refused)\n"
    assert "Traceback" not in proc.stdout + proc.stderr


def test_cli_needs_the_api_key_and_takes_it_from_option_or_environment(serve, tmp_path):
    url, _ = serve(api_keys=f"alice:{ALICE},bob:{BOB}")
    runner = CliRunner()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(TINY))
    env = {"ODEFORGE_URL": url, "ODEFORGE_API_KEY": "", "COLUMNS": "200"}

    refused = runner.invoke(cli_app, ["submit", str(spec)], env=env)
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: 401 unauthorized: ") and refused.stderr.count("\n") == 1

    out = runner.invoke(cli_app, ["submit", str(spec), "--api-key", ALICE], env=env)
    assert out.exit_code == 0, out.output
    job_id = out.stdout.split()[1]
    listed = runner.invoke(cli_app, ["list", "--json"], env={**env, "ODEFORGE_API_KEY": ALICE})
    assert listed.exit_code == 0 and [j["id"] for j in json.loads(listed.stdout)] == [job_id]

    other = runner.invoke(cli_app, ["status", job_id, "--api-key", BOB], env=env)
    assert other.exit_code == 1 and other.stderr == f"error: 404 job not found: no job with id '{job_id}'\n"
    got = runner.invoke(cli_app, ["get", job_id, "--json", "--api-key", ALICE], env=env)
    assert got.exit_code == 0 and json.loads(got.stdout)["id"] == job_id
    cancelled = runner.invoke(cli_app, ["cancel", job_id, "--api-key", ALICE], env=env)
    assert cancelled.exit_code == 0 and cancelled.stdout == f"job {job_id} cancelled\n"


def test_cli_data_sets_events_delete_and_bad_input(api, tmp_path):
    url, _ = api
    runner = CliRunner()
    env = {"ODEFORGE_URL": url, "COLUMNS": "200"}
    csv = tmp_path / "p.csv"
    np.savetxt(csv, np.random.default_rng(1).normal(size=(12, 2)), delimiter=",")
    out = runner.invoke(cli_app, ["upload", str(csv)], env=env)
    assert out.exit_code == 0 and out.stdout.startswith("dataset ") and out.stdout.rstrip().endswith("shape [12, 2]")
    ds_id = out.stdout.split()[1]
    listed = runner.invoke(cli_app, ["datasets", "list", "--json"], env=env)
    assert [(d["id"], d["filename"]) for d in json.loads(listed.stdout)] == [(ds_id, "p.csv")]
    assert runner.invoke(cli_app, ["datasets", "delete", ds_id], env=env).stdout == f"dataset {ds_id} deleted\n"
    gone = runner.invoke(cli_app, ["datasets", "delete", ds_id], env=env)
    assert gone.exit_code == 1 and gone.stderr.startswith("error: 404 ") and gone.stderr.count("\n") == 1

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(TINY))
    job_id = runner.invoke(cli_app, ["submit", str(spec), "--name", "cli run", "--tag", "a", "--tag", "b"],
                           env=env).stdout.split()[1]
    runner.invoke(cli_app, ["cancel", job_id], env=env)
    lines = runner.invoke(cli_app, ["events", job_id], env=env).stdout.splitlines()
    assert json.loads(lines[-1])["data"]["status"] == "cancelled"
    shown = json.loads(runner.invoke(cli_app, ["get", job_id, "--json"], env=env).stdout)
    assert (shown["name"], shown["tags"]) == ("cli run", ["a", "b"])
    assert runner.invoke(cli_app, ["delete", job_id], env=env).stdout == f"job {job_id} deleted\n"
    assert runner.invoke(cli_app, ["status", job_id], env=env).exit_code == 1

    bad = runner.invoke(cli_app, ["log-density", "0" * 32, "[[0, oops]]"], env=env)
    assert bad.exit_code == 2 and bad.stderr.startswith("error: points: ") and bad.stderr.count("\n") == 1


def test_client_imports_no_service_code_and_agrees_on_terminal_statuses():
    from jobs.status import TERMINAL

    assert odeforge.TERMINAL == {s.value for s in TERMINAL}
    probe = "import sys, odeforge; print(sorted({m.split('.')[0] for m in sys.modules} & " \
            "{'fastapi', 'torch', 'sqlalchemy', 'numpy', 'service', 'jobs', 'node_engine', 'worker'}))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


# ---- run metadata, deletion, data sets, the live stream (issue 15's endpoints) -----------------------
def test_name_tag_filters_delete_and_datasets(api):
    url, _ = api
    with odeforge.Client(url) as c:
        a = c.submit(TINY, name="Moons baseline", tags=["cnf", "baseline"])
        b = c.submit({**TINY, "name": "moons wide", "tags": ["cnf"]})
        assert (a["name"], a["tags"]) == ("Moons baseline", ["cnf", "baseline"])
        assert [j["id"] for j in c.list(tag="cnf", page_size=1)] == [b["id"], a["id"]]
        assert [j["id"] for j in c.list(tag="baseline")] == [a["id"]]
        assert [j["id"] for j in c.list(name="BASELINE")] == [a["id"]]
        c.delete(a["id"])
        with pytest.raises(odeforge.ProblemError) as info:
            c.get(a["id"])
        assert info.value.status == 404
        assert [j["id"] for j in c.list()] == [b["id"]]

        buf = io.BytesIO()
        np.save(buf, np.arange(24.0).reshape(12, 2) ** 1.5)
        first = c.upload(buf.getvalue(), filename="one.npy")
        second = c.upload(b"x,y\n" + b"".join(f"{i},{i * i % 7}\n".encode() for i in range(11)), filename="two.csv")
        assert [d["id"] for d in c.datasets(page_size=1)] == [second["id"], first["id"]]
        assert [(d["kind"], d["shape"], d["filename"]) for d in c.datasets()] == [("array", [11, 2], "two.csv"),
                                                                                ("array", [12, 2], "one.npy")]
        c.delete_dataset(first["id"])
        assert [d["id"] for d in c.datasets()] == [second["id"]]
        with pytest.raises(odeforge.ProblemError) as info:
            c.delete_dataset(first["id"])
        assert info.value.status == 404


def test_events_of_a_real_stream_end_at_the_final_status_and_resume_after_an_id(api):
    url, _ = api
    with odeforge.Client(url) as c:
        job = c.submit(TINY)
        c.cancel(job["id"])
        events = list(c.events(job["id"]))
        assert [e.event for e in events][-1] == "status" and events[-1].data["status"] == "cancelled"
        assert len(events) >= 2, events  # queued, cancelled
        ids = [int(e.id) for e in events]
        assert ids == sorted(set(ids))
        rest = list(c.events(job["id"], last_event_id=events[0].id))
        assert [(e.id, e.event, e.data) for e in rest] == [(e.id, e.event, e.data) for e in events[1:]]


def test_a_job_driven_through_the_worker_side_of_the_store(api):
    """Metric rows written as a worker writes them (fenced JobStore calls): the client's metrics, wait
    and events, and the CLI's logs and wait, show exactly those rows and the final status."""
    from jobs.store import JobStore
    from jobs.tables import make_engine, make_sessionmaker

    url, settings = api
    engine = make_engine(settings.database_url)
    store = JobStore(make_sessionmaker(engine))
    rows = [{"step": 1, "loss": 2.5, "nfe_forward": 20}, {"step": 2, "loss": 1.25, "nfe_forward": 26}]
    try:
        with odeforge.Client(url) as c:
            job_id = c.submit(TINY)["id"]
            row, token = store.claim(job_id)
            assert store.record(row, token, rows, step=2, total_steps=3, latest=rows[-1])
            assert c.get(job_id)["status"] == "running" and c.metrics(job_id) == rows
            assert c.metrics(job_id, since_step=1) == rows[1:]
            with pytest.raises(TimeoutError):
                c.wait(job_id, timeout=0.3, poll_s=0.1)
            assert store.finish(row, token, "succeeded", latest=rows[-1])
            assert c.wait(job_id, timeout=10)["status"] == "succeeded"
            events = [(e.event, e.data) for e in c.events(job_id)]
        assert [d for kind, d in events if kind == "metric"] == rows
        assert [d["status"] for kind, d in events if kind == "status"] == ["queued", "running", "succeeded"]
        assert events[-2][0] == "result" and events[-2][1]["status"] == "succeeded"
    finally:
        engine.dispose()

    runner = CliRunner()
    env = {"ODEFORGE_URL": url, "COLUMNS": "200"}
    logs = runner.invoke(cli_app, ["logs", job_id], env=env)
    assert logs.stdout == "step=1  loss=2.5  nfe_forward=20\nstep=2  loss=1.25  nfe_forward=26\n"
    followed = runner.invoke(cli_app, ["logs", job_id, "-f"], env=env)
    assert followed.exit_code == 0 and followed.stdout.startswith(logs.stdout)
    assert followed.stdout.rstrip().endswith("# status succeeded")
    waited = runner.invoke(cli_app, ["wait", job_id], env=env)
    assert waited.exit_code == 0 and "succeeded" in waited.stdout


def test_cli_download_writes_the_checkpoint_into_a_folder_or_file(api, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    from jobs.artifacts import LocalArtifactStore, checkpoint_key

    url, settings = api
    with odeforge.Client(url) as c:
        job_id = c.submit(TINY)["id"]
    artifacts = LocalArtifactStore(settings.artifact_dir)
    artifacts.put(checkpoint_key(job_id, "step-000010.safetensors"), b"ten")
    artifacts.put(checkpoint_key(job_id, "step-000002.safetensors"), b"two")
    runner = CliRunner()
    env = {"ODEFORGE_URL": url}
    out = runner.invoke(cli_app, ["download", job_id, "-o", str(out_dir)], env=env)
    assert out.exit_code == 0 and out.stdout == f"{out_dir / f'{job_id}-step-000010.safetensors'}\n"  # the newest
    assert (out_dir / f"{job_id}-step-000010.safetensors").read_bytes() == b"ten"
    out = runner.invoke(cli_app, ["download", job_id, "step-000002.safetensors", "-o", str(out_dir / "a.st")], env=env)
    assert out.exit_code == 0 and (out_dir / "a.st").read_bytes() == b"two"
    missing = runner.invoke(cli_app, ["download", job_id, "final.safetensors", "-o", str(out_dir / "b")], env=env)
    assert missing.exit_code == 1 and missing.stderr.startswith("error: 404 checkpoint not found")
    assert not (out_dir / "b").exists() and {p.name for p in out_dir.iterdir()} == {
        "a.st", f"{job_id}-step-000010.safetensors"}  # no partial file left behind
