"""Inference flood (issue 14): does the rest of the API answer while inference is saturated?

The issue's scenario: a CNF job served as dopri8 at eval_rtol = eval_atol = 1e-13, end_time 10,
max_num_steps 10^6, and 45 clients each sending one-point log-density requests back to back. While
they run, a prober measures the latency of ``GET /v1/jobs/{id}`` (every 0.1 s), and of ``/readyz``,
``/metrics``, ``/healthz`` and ``POST /v1/jobs`` (each every 0.5 s).

The API runs as a real ``uvicorn`` process (its own interpreter, so the clients' threads do not share
its GIL) on SQLite and the local Redis (127.0.0.1:6379, a queue of its own, removed afterwards).
The served model is the untrained flow at step 0 (training it at these tolerances takes minutes);
one point costs 758 field evaluations.

    python benchmarks/flood.py [--seconds 30] [--clients 45] [--code /path/to/checkout]

``--code`` runs the API from another checkout (e.g. the code before this change) for comparison.
Prints one table row per probed endpoint (n, p50, p99, max in ms; failures = no answer within 10 s),
the inference answers by status, and how long the API took to exit after a SIGTERM sent while the
flood still ran. 
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SLOW = {"model": {"type": "cnf", "hidden_dims": [8, 8], "end_time": 10.0},
        "dataset": {"name": "moons", "n_samples": 256},
        "solver": {"method": "dopri8", "eval_rtol": 1e-13, "eval_atol": 1e-13, "max_num_steps": 1_000_000},
        "training": {"iterations": 1, "batch_size": 16}}
PROBE_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint() -> bytes:
    from node_engine.training import build_trainer
    from service.schemas import JobCreate

    return build_trainer(JobCreate.model_validate(SLOW).model_dump(mode="json")).checkpoint()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=45)
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose API is measured")
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="odeforge-flood-"))
    queue = f"odeforge-flood-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODEFORGE_")}
    env.update(ODEFORGE_DATABASE_URL=f"sqlite:///{data / 'jobs.db'}", ODEFORGE_ARTIFACT_DIR=str(data / "artifacts"),
               ODEFORGE_BROKER_URL="redis://127.0.0.1:6379/0", ODEFORGE_QUEUE=queue, ODEFORGE_DEVICE="cpu",
               OMP_NUM_THREADS="1", PYTHONPATH=str(args.code))
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
                               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                              cwd=args.code, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the API did not start"
            time.sleep(0.2)
        job = httpx.post(f"{url}/v1/jobs", json=SLOW, timeout=30).json()["id"]
        from jobs.artifacts import LocalArtifactStore, checkpoint_prefix

        LocalArtifactStore(data / "artifacts").put(f"{checkpoint_prefix(job)}/final.safetensors", _checkpoint())
        warm = httpx.post(f"{url}/v1/jobs/{job}/log-density", json={"points": [[0.3, 0.2]]}, timeout=300)
        print(f"warm-up (model load + one point): {warm.status_code}, nfe {warm.json().get('nfe')}")
        _flood(url, job, args.seconds, args.clients, server)
    finally:
        if server.poll() is None:
            server.kill()
        import redis

        redis.Redis.from_url("redis://127.0.0.1:6379/0").delete(queue, f"_kombu.binding.{queue}")


def _flood(url: str, job: str, seconds: float, clients: int, server: subprocess.Popen) -> None:
    stop = threading.Event()
    answers: Counter = Counter()
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = np.random.default_rng(i)
        with httpx.Client(timeout=300) as c:
            while not stop.is_set():
                try:
                    r = c.post(f"{url}/v1/jobs/{job}/log-density", json={"points": rng.normal(size=(1, 2)).tolist()})
                    kind = str(r.status_code) if r.status_code == 200 else f"{r.status_code} {r.json()['type'].rsplit('/', 1)[-1]}"
                except httpx.HTTPError as exc:
                    kind = type(exc).__name__
                with lock:
                    answers[kind] += 1
                if kind.startswith("503"):
                    time.sleep(1.0)  # what a client told Retry-After would do (it says more; we are impatient)

    latencies: dict[str, list[float]] = {}
    failures: Counter = Counter()

    probes_done = threading.Event()

    def probe(name: str, every: float, call) -> None:
        with httpx.Client(timeout=PROBE_TIMEOUT_S) as c:
            while not probes_done.is_set():
                start = time.perf_counter()
                try:
                    r = call(c)
                    ok = r.status_code < 500
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.setdefault(name, []).append(time.perf_counter() - start)
                else:
                    failures[name] += 1
                time.sleep(every)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    probes = {
        "GET /v1/jobs/{id}": (0.1, lambda c: c.get(f"{url}/v1/jobs/{job}")),
        "GET /readyz": (0.5, lambda c: c.get(f"{url}/readyz")),
        "GET /metrics": (0.5, lambda c: c.get(f"{url}/metrics")),
        "GET /healthz": (0.5, lambda c: c.get(f"{url}/healthz")),
        "POST /v1/jobs": (0.5, lambda c: c.post(f"{url}/v1/jobs", json={**SLOW, "training": {"iterations": 1}})),
    }
    for t in threads:
        t.start()
    time.sleep(2.0)  # let the flood saturate inference first
    probe_threads = [threading.Thread(target=probe, args=(name, every, call)) for name, (every, call) in probes.items()]
    for t in probe_threads:
        t.start()
    time.sleep(seconds)
    probes_done.set()
    for t in probe_threads:
        t.join(600)
    stop_probes_at = time.monotonic()
    server.terminate()
    try:
        server.wait(120)
        shutdown = f"API exited {time.monotonic() - stop_probes_at:.1f} s after SIGTERM, during the flood"
    except subprocess.TimeoutExpired:
        shutdown = "API still alive 120 s after SIGTERM, during the flood"
    stop.set()
    for t in threads:
        t.join(600)
    print(f"\n{clients} clients flooding one-point log-density for {seconds:g} s")
    print("| endpoint | n | p50 ms | p99 ms | max ms | no answer in 10 s |")
    print("|---|---|---|---|---|---|")
    for name in probes:
        x = np.array(latencies.get(name, [np.nan])) * 1000
        print(f"| `{name}` | {len(latencies.get(name, []))} | {np.nanpercentile(x, 50):.0f} | "
              f"{np.nanpercentile(x, 99):.0f} | {np.nanmax(x):.0f} | {failures[name]} |")
    print("inference answers:", dict(sorted(answers.items())))
    print(shutdown)


if __name__ == "__main__":
    main()
