"""Inference is bounded (issue 14): a saturated inference pool refuses more work at once, job status and
health keep answering, a request's solves stop at its deadline, when its client leaves, or past the NFE
budget, each with a named problem.

A real uvicorn server (in a thread) and real HTTP clients: disconnects are only real over a socket.
The slow model is an untrained 2-D CNF served as in the issue's report (dopri8, eval tolerances 1e-13,
``end_time`` 10, ``max_num_steps`` 10^6): one point costs 758 field evaluations (0.4 s on an idle core);
5,000 points take 2.3 s idle, so the 100,000 points of ``BIG`` would hold the pool for about 45 s even on
an idle machine (minutes on a loaded one). No latency is asserted: the checks are what answers, and
that the pool's slot comes back long before the unstopped solve could have ended.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

import httpx
import pytest

from jobs.artifacts import LocalArtifactStore, checkpoint_prefix
from service.app import create_app
from tests.servers import free_port

pytestmark = pytest.mark.redis

SLOW = {"model": {"type": "cnf", "hidden_dims": [8, 8], "end_time": 10.0},
        "dataset": {"name": "moons", "n_samples": 256},
        "solver": {"method": "dopri8", "eval_rtol": 1e-13, "eval_atol": 1e-13, "max_num_steps": 1_000_000},
        "training": {"iterations": 1, "batch_size": 16}}
ONE_POINT_NFE = 758  # of this untrained model at [0.3, 0.2] (measured in-process, see test_nfe_budget...)
BIG = [[1e-4 * i, -2e-4 * i] for i in range(100_000)]  # the schema's maximum; ~3 MB of JSON; ~45 s unstopped


@pytest.fixture(scope="module")
def slow_checkpoint() -> bytes:
    """The model at step 0 (training it at these tolerances would take minutes)."""
    from node_engine.training import build_trainer
    from service.schemas import JobCreate

    return build_trainer(JobCreate.model_validate(SLOW).model_dump(mode="json")).checkpoint()


class LiveServer:
    def __init__(self, settings):
        import uvicorn

        self.app = create_app(settings)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    @property
    def pool(self):
        return self.app.state.services.inference


@pytest.fixture
def serve(make_settings, slow_checkpoint) -> Iterator:
    servers: list[LiveServer] = []

    def start(**overrides) -> tuple[LiveServer, str]:
        settings = make_settings(inference_workers=1, inference_queue=0, max_points=100_000,
                                 max_json_bytes=32 * 2**20, **overrides)
        server = LiveServer(settings).__enter__()
        servers.append(server)
        job = httpx.post(f"{server.url}/v1/jobs", json=SLOW, timeout=30).json()["id"]
        LocalArtifactStore(settings.artifact_dir).put(f"{checkpoint_prefix(job)}/final.safetensors", slow_checkpoint)
        return server, job

    yield start
    for server in servers:
        server.__exit__()


def _problem_type(resp: httpx.Response) -> str:
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.text
    return resp.json()["type"].rsplit("/", 1)[-1]


def _wait_admitted(url: str, job: str, timeout: float) -> httpx.Response:
    """POST one point until it is admitted (not 503 inference-busy); the answer."""
    deadline = time.monotonic() + timeout
    while True:
        resp = httpx.post(f"{url}/v1/jobs/{job}/log-density", json={"points": [[0.3, 0.2]]}, timeout=120)
        if resp.status_code != 503 or _problem_type(resp) != "inference-busy":
            return resp
        assert time.monotonic() < deadline, "the inference slot never came back: the solve was not stopped"
        time.sleep(0.2)


def test_a_saturated_pool_refuses_at_once_status_still_answers_and_the_deadline_stops_the_solve(serve):
    server, job = serve(inference_timeout_s=4.0)
    url = server.url
    warm = httpx.post(f"{url}/v1/jobs/{job}/log-density", json={"points": [[0.3, 0.2]]}, timeout=120)
    assert warm.status_code == 200, warm.text  # loads the model; one point fits the 4 s budget
    big: dict = {}
    flood = threading.Thread(target=lambda: big.setdefault("resp", httpx.post(
        f"{url}/v1/jobs/{job}/log-density", json={"points": BIG}, timeout=120)))
    flood.start()
    deadline = time.monotonic() + 30
    while server.pool.in_flight < 1:  # the big request holds the only slot
        assert time.monotonic() < deadline and "resp" not in big, big.get("resp") and big["resp"].text[:300]
        time.sleep(0.02)
    busy = httpx.post(f"{url}/v1/jobs/{job}/log-density", json={"points": [[0.0, 0.0]]}, timeout=30)
    assert busy.status_code == 503 and _problem_type(busy) == "inference-busy"
    assert int(busy.headers["retry-after"]) >= 1
    # The rest of the API answers while inference is saturated (generous functional timeouts only).
    for path in (f"/v1/jobs/{job}", "/healthz", "/readyz", "/metrics"):
        assert httpx.get(url + path, timeout=10).status_code == 200, path
    assert httpx.post(f"{url}/v1/jobs", json=SLOW, timeout=10).status_code == 202
    flood.join(120)
    assert big["resp"].status_code == 503 and _problem_type(big["resp"]) == "inference-timeout", big["resp"].text
    assert "ODEFORGE_INFERENCE_TIMEOUT_S" in big["resp"].json()["detail"]
    # The solve was stopped at the deadline: the slot is free long before 100,000 points could be solved.
    assert _wait_admitted(url, job, timeout=30).status_code == 200


@pytest.mark.slow  # ~10 s on the shared 2-core machine; the deadline test above covers the stop itself
def test_a_client_that_leaves_stops_its_solve(serve):
    server, job = serve(inference_timeout_s=600.0)
    url = server.url
    assert httpx.post(f"{url}/v1/jobs/{job}/log-density", json={"points": [[0.3, 0.2]]}, timeout=120).status_code == 200
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(f"{url}/v1/jobs/{job}/log-density", json={"points": BIG}, timeout=2.0)
    # Without the stop, the 100,000-point solve would hold the only slot for ~45 s or more (the deadline is 600 s).
    assert _wait_admitted(url, job, timeout=30).status_code == 200
    assert server.pool.in_flight == 0


def test_the_nfe_budget_cuts_the_solve_with_a_named_problem(serve, slow_checkpoint):
    import numpy as np

    from node_engine.inference import load_model

    # the reference count, in-process: what one point of this model costs without a budget
    assert load_model(slow_checkpoint).log_density_rows(np.array([[0.3, 0.2]]))[2] == ONE_POINT_NFE
    server, job = serve(inference_max_nfe=ONE_POINT_NFE // 2)
    resp = httpx.post(f"{server.url}/v1/jobs/{job}/log-density", json={"points": [[0.0, 0.0], [0.3, 0.2]]},
                      timeout=120)
    assert resp.status_code == 422 and _problem_type(resp) == "inference-budget-exceeded", resp.text
    assert "ODEFORGE_INFERENCE_MAX_NFE" in resp.json()["detail"]
    assert resp.json()["errors"][0]["field"] in ("points[0]", "points[1]")
    samples = httpx.post(f"{server.url}/v1/jobs/{job}/samples", json={"n": 2}, timeout=120)
    assert samples.status_code == 422 and _problem_type(samples) == "inference-budget-exceeded", samples.text
    # within the budget, the same point is answered
    server2, job2 = serve(inference_max_nfe=ONE_POINT_NFE)
    ok = httpx.post(f"{server2.url}/v1/jobs/{job2}/log-density", json={"points": [[0.3, 0.2]]}, timeout=120)
    assert ok.status_code == 200 and ok.json()["nfe"] == ONE_POINT_NFE
