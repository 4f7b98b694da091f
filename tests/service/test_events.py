"""``GET /v1/jobs/{id}/events``: Server-Sent Events of a real job, trained by the worker's own code
(``worker.runner.run_job``, the function the Celery task calls) against the real job store, streamed
over HTTP from a real server (uvicorn in a thread) with httpx.

The expected events come from elsewhere: the metric rows the job store pages out through
``GET /v1/jobs/{id}/metrics``, the checkpoint files listed by ``/checkpoints``, and the spec's
cadence (log every step, evaluate and checkpoint every 3). The stream is parsed here by the rules
of the WHATWG HTML standard ("Server-sent events", the event stream interpretation), not by the
code under test.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Iterator

import httpx
import pytest
import uvicorn

from jobs.artifacts import LocalArtifactStore
from jobs.settings import Settings
from jobs.store import JobStore
from service.app import create_app
from worker.runner import WorkerContext, run_job

SPEC = {"model": {"type": "mlp", "hidden": 8}, "dataset": {"name": "digits", "n_samples": 200},
        "training": {"iterations": 6, "batch_size": 32, "eval_every": 3, "checkpoint_every": 3, "log_every": 1},
        "name": "events demo", "tags": ["sse"]}
ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-fedcba9876543210"


def parse_sse(raw: str) -> tuple[list[dict], int, int | None]:
    """``(events, heartbeat comments, retry ms)``: each event ``{"id", "event", "data"}`` (WHATWG rules:
    ``field: value`` lines, one leading space dropped, data lines joined by newlines, blank line
    dispatches, ``:`` starts a comment)."""
    events, comments, retry = [], 0, None
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in raw.split("\n"):
        if line == "":
            if data or fields:
                events.append({**fields, "data": "\n".join(data)})
            fields, data = {}, []
            continue
        if line.startswith(":"):
            comments += 1
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "retry":
            retry = int(value)
        else:
            fields[name] = value
    return events, comments, retry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_api(tmp_path, request) -> Iterator[tuple[str, Settings]]:
    """A real HTTP server (uvicorn, in a thread) for ``Settings(**request.param)``, an in-process broker."""
    overrides = dict(getattr(request, "param", {}))
    database = overrides.pop("database", "sqlite")
    url = request.getfixturevalue("pg_url") if database == "postgresql" else f"sqlite:///{tmp_path / 'jobs.db'}"
    settings = Settings(database_url=url,
                        broker_url="memory://", artifact_dir=tmp_path / "artifacts", device="cpu",
                        events_poll_s=0.05, events_heartbeat_s=0.2, cancel_poll_s=0.05, **overrides)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=1))  # open streams: 1 s, not 10
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", settings
    server.should_exit = True
    thread.join(10)


def worker(settings: Settings) -> WorkerContext:
    return WorkerContext(settings, JobStore.from_settings(settings), LocalArtifactStore(settings.artifact_dir))


def read_stream(url: str, headers: dict | None = None, params: dict | None = None) -> str:
    with httpx.stream("GET", url, headers=headers, params=params, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        return "".join(resp.iter_text())


@pytest.mark.parametrize("live_api", [{}, pytest.param({"database": "postgresql"}, marks=pytest.mark.postgres)],
                         indirect=True, ids=["sqlite", "postgresql"])
def test_a_job_streams_live_to_its_end_and_a_resumed_stream_is_exactly_the_rest(live_api):
    import json

    base, settings = live_api
    with httpx.Client(base_url=base, timeout=30) as client:
        job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
        chunks: list[str] = []  # appended as they arrive

        def listen() -> None:
            with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", timeout=60) as resp:
                assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
                for chunk in resp.iter_text():
                    chunks.append(chunk)

        listener = threading.Thread(target=listen)
        listener.start()  # subscribed while the job is still queued: what follows arrives live
        deadline = time.monotonic() + 30  # idle: heartbeats every 0.2 s; wait for two (a loaded machine is slow)
        while "".join(chunks).count(": heartbeat") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run_job(job_id, worker(settings)) == "succeeded"
        listener.join(30)
        assert not listener.is_alive(), "the stream did not end at the final status"

        events, heartbeats, retry = parse_sse("".join(chunks))
        assert heartbeats >= 2 and retry and retry > 0
        ids = [int(e["id"]) for e in events]
        assert ids == sorted(set(ids)), "ids strictly increase"
        kinds = [e["event"] for e in events]
        data = [json.loads(e["data"]) for e in events]
        assert kinds[:2] == ["status", "status"] and [d["status"] for d in data[:2]] == ["queued", "running"]
        assert kinds[-2:] == ["result", "status"] and data[-1] == {"status": "succeeded"}

        history = client.get(f"/v1/jobs/{job_id}/metrics").json()["history"]
        metrics = [d for k, d in zip(kinds, data) if k == "metric"]
        assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
        assert [m["loss"] for m in metrics] == [r["loss"] for r in history]
        evaluations = [d for k, d in zip(kinds, data) if k == "evaluation"]
        assert [e["step"] for e in evaluations] == [3, 6]
        assert [e["test_accuracy"] for e in evaluations] == [history[2]["test_accuracy"], history[5]["test_accuracy"]]
        checkpoints = [d["name"] for k, d in zip(kinds, data) if k == "checkpoint"]
        listed = [c["name"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"]]
        assert sorted(checkpoints) == sorted(listed) == ["final.safetensors", "step-000003.safetensors"]
        # each checkpoint event comes after the metric row of its step
        assert kinds.index("checkpoint") > kinds.index("metric") + 2
        result = data[-2]
        assert result["status"] == "succeeded" and result["error"] is None
        assert result["metrics"]["test_accuracy"] == client.get(f"/v1/jobs/{job_id}").json()["metrics"]["test_accuracy"]

        # Resuming after any event yields exactly the events after it (header or query parameter).
        url = f"{base}/v1/jobs/{job_id}/events"
        for cut in (1, len(events) // 2, len(events) - 2):
            rest, _, _ = parse_sse(read_stream(url, headers={"Last-Event-ID": events[cut]["id"]}))
            assert rest == events[cut + 1:]
        rest, _, _ = parse_sse(read_stream(url, params={"last_event_id": events[3]["id"]}))
        assert rest == events[4:]
        # the header (sent by EventSource on reconnect) wins over the query of the first connection
        rest, _, _ = parse_sse(read_stream(url, headers={"Last-Event-ID": events[5]["id"]},
                                           params={"last_event_id": events[3]["id"]}))
        assert rest == events[6:]
        assert parse_sse(read_stream(url, headers={"Last-Event-ID": events[-1]["id"]}))[0] == []
        bad = client.get(url, headers={"Last-Event-ID": "x1"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "Last-Event-ID"


@pytest.mark.parametrize("live_api", [{"api_keys": f"alice:{ALICE},bob:{BOB}"}], indirect=True)
def test_another_keys_job_stream_is_a_404(live_api):
    base, _ = live_api
    with httpx.Client(base_url=base, timeout=30) as client:
        job_id = client.post("/v1/jobs", json=SPEC, headers={"Authorization": f"Bearer {ALICE}"}).json()["id"]
        resp = client.get(f"/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {BOB}"})
        assert resp.status_code == 404 and resp.headers["content-type"].startswith("application/problem+json")
        assert client.get(f"/v1/jobs/{job_id}/events").status_code == 401
        # the owner's stream of a queued job is open (first bytes: the retry line), then closed by us
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {ALICE}"}) as r:
            assert r.status_code == 200
            assert next(r.iter_lines()).startswith("retry:")
