"""Service load benchmark (issue 7): inference under concurrent load, and a burst of job submissions.

Starts the embedded service (``odeforge serve``: API, one worker, private broker, SQLite) on a free
port in a temporary data directory, trains a small 2-D CNF through the API, then

1. ``--clients`` concurrent clients (default 50) each POST ``/v1/jobs/{id}/log-density`` with
   ``--points`` points (default 1,000) back to back for ``--seconds`` (default 30), while a probe
   (its own process) GETs ``/healthz`` every 100 ms. Reports errors, latency p50/p99/max,
   requests/s and points/s, and the ``/healthz`` latency meanwhile.
2. ``--burst`` job submissions (default 200 tiny jobs) sent at once (50 in flight): counts the
   202s, checks every accepted id is listed by ``GET /v1/jobs``, and waits until all are terminal.

    python benchmarks/load.py                  # the numbers in docs/benchmarks.md
    python benchmarks/load.py --seconds 5 --burst 20 --train-iterations 20   # a quick smoke run

Prints a Markdown summary and writes the raw numbers as JSON (``--json``). Not a test: nothing here
asserts a timing; the exit status is 1 if any request failed or any job was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CNF_SPEC = {
    "model": {"type": "cnf", "hidden_dims": [32, 32], "nonlinearity": "tanh"},
    "dataset": {"name": "moons", "n_samples": 4000},
    "solver": {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5, "adjoint": True},
    "training": {"iterations": 100, "batch_size": 256, "lr": 1e-2, "eval_every": 100, "checkpoint_every": 100},
}
TINY_JOBS = [  # the burst: the cheapest jobs of each density kind
    {"model": {"type": "planar", "num_layers": 2}, "dataset": {"name": "moons", "n_samples": 200},
     "training": {"iterations": 2, "batch_size": 32, "eval_every": 2, "checkpoint_every": 2}},
    {"model": {"type": "cnf", "hidden_dims": [4]}, "dataset": {"name": "circles", "n_samples": 200},
     "solver": {"rtol": 1e-3, "atol": 1e-3},
     "training": {"iterations": 1, "batch_size": 32, "eval_every": 1, "checkpoint_every": 1}},
]
TERMINAL = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def start_service(data_dir: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODEFORGE_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(data_dir / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                             "--data-dir", str(data_dir)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"odeforge serve exited; see {data_dir / 'serve.log'}")
            try:
                if c.get("/readyz").status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise RuntimeError("the service did not become ready")


def train_cnf(client: httpx.Client, iterations: int) -> tuple[str, float]:
    spec = json.loads(json.dumps(CNF_SPEC))
    spec["training"].update(iterations=iterations, eval_every=iterations, checkpoint_every=iterations)
    start = time.monotonic()
    job = client.post("/v1/jobs", json=spec).json()
    while job["status"] not in TERMINAL:
        time.sleep(1.0)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"training failed: {job}")
    return job["id"], time.monotonic() - start


def probe_healthz(base: str, seconds: float, results) -> None:
    """GET /healthz every 100 ms for ``seconds``; puts ``{"latencies": [...], "errors": {...}}`` on ``results``."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop_at = time.monotonic() + seconds
    with httpx.Client(base_url=base, timeout=30) as client:
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                resp = client.get("/healthz")
                if resp.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[f"HTTP {resp.status_code}"] = errors.get(f"HTTP {resp.status_code}", 0) + 1
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            time.sleep(max(0.0, 0.1 - (time.perf_counter() - t0)))
    results.put({"latencies": latencies, "errors": errors})


async def log_density_load(base: str, job_id: str, clients: int, points: int, seconds: float) -> dict:
    rng = np.random.default_rng(0)
    # A few pre-encoded bodies (moons live in about [-1.5, 2.5] x [-1, 1.5]): the client's CPU goes to
    # sending, not to JSON encoding.
    bodies = [json.dumps({"points": (rng.uniform([-1.5, -1.0], [2.5, 1.5], size=(points, 2))).tolist()}).encode()
              for _ in range(8)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    nfe: list[int] = []
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 5, max_keepalive_connections=clients + 5)

    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        async def one_client(i: int) -> None:
            k = i
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                try:
                    resp = await client.post(f"/v1/jobs/{job_id}/log-density", content=bodies[k % len(bodies)],
                                             headers={"content-type": "application/json"})
                    ok = resp.status_code == 200 and len(resp.json()["log_density"]) == points
                    key = None if ok else f"HTTP {resp.status_code}"
                    if ok:
                        nfe.append(resp.json()["nfe"])
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                if key is None:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[key] = errors.get(key, 0) + 1
                k += 1

        # The probe runs in its own process: its latencies are the server's, not the load generator's.
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        prober = ctx.Process(target=probe_healthz, args=(base, seconds, results))
        prober.start()
        t_start = time.monotonic()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.monotonic() - t_start
        probe = results.get(timeout=60)
        prober.join(10)
        health = probe["latencies"]
        for key, n in probe["errors"].items():
            errors["healthz " + key] = n
    return {
        "clients": clients, "points_per_request": points, "seconds": elapsed, "requests": len(latencies),
        "errors": errors, "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99),
        "latency_max_s": max(latencies, default=float("nan")), "requests_per_s": len(latencies) / elapsed,
        "points_per_s": len(latencies) * points / elapsed, "nfe_median": float(np.median(nfe)) if nfe else None,
        "healthz_n": len(health), "healthz_p50_s": percentile(health, 50), "healthz_p99_s": percentile(health, 99),
        "healthz_max_s": max(health, default=float("nan")),
    }


async def submission_burst(base: str, n: int, in_flight: int, timeout: float) -> dict:
    sem = asyncio.Semaphore(in_flight)
    statuses: dict[int, int] = {}
    accepted: list[str] = []
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        async def submit(i: int) -> None:
            async with sem:
                resp = await client.post("/v1/jobs", json=TINY_JOBS[i % len(TINY_JOBS)],
                                         headers={"Idempotency-Key": f"burst-{i}"})
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                if resp.status_code == 202:
                    accepted.append(resp.json()["id"])

        t0 = time.monotonic()
        await asyncio.gather(*(submit(i) for i in range(n)))
        submit_s = time.monotonic() - t0

        listed: set[str] = set()
        token = None
        while True:
            resp = await client.get("/v1/jobs", params={"limit": 500, **({"page_token": token} if token else {})})
            body = resp.json()
            listed |= {j["id"] for j in body["jobs"]}
            token = body["next_page_token"]
            if token is None:
                break
        final: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        pending = set(accepted)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                job = (await client.get(f"/v1/jobs/{job_id}")).json()
                if job["status"] in TERMINAL:
                    final[job_id] = job["status"]
                    pending.discard(job_id)
            if pending:
                await asyncio.sleep(1.0)
        done_s = time.monotonic() - t0
    outcome: dict[str, int] = {}
    for status in final.values():
        outcome[status] = outcome.get(status, 0) + 1
    return {"submitted": n, "http_statuses": statuses, "accepted": len(accepted),
            "accepted_and_listed": len(set(accepted) & listed), "terminal": len(final), "outcome": outcome,
            "not_terminal": len(pending), "submit_seconds": submit_s, "all_terminal_seconds": done_s}


def markdown(load: dict, burst: dict, meta: dict) -> str:
    ms = lambda s: f"{1000 * s:.0f} ms"  # noqa: E731
    ms1 = lambda s: f"{1000 * s:.1f} ms"  # noqa: E731
    errors = sum(load["errors"].values())
    return "\n".join([
        f"- log-density: {load['clients']} concurrent clients x {load['points_per_request']} points, "
        f"{load['seconds']:.0f} s: **{errors} errors** in {load['requests']} requests; latency p50 "
        f"{ms(load['latency_p50_s'])}, p99 {ms(load['latency_p99_s'])}, max {ms(load['latency_max_s'])}; "
        f"{load['requests_per_s']:.1f} requests/s = **{load['points_per_s']:,.0f} points/s** "
        f"(median NFE per answer {load['nfe_median']}).",
        f"- `/healthz` meanwhile ({load['healthz_n']} probes, one per 100 ms): p50 {ms1(load['healthz_p50_s'])}, "
        f"p99 {ms1(load['healthz_p99_s'])}, max {ms1(load['healthz_max_s'])}.",
        f"- burst: {burst['submitted']} submissions (50 in flight): {burst['accepted']} accepted (HTTP "
        f"{burst['http_statuses']}) in {burst['submit_seconds']:.1f} s, {burst['accepted_and_listed']} listed "
        f"by `GET /v1/jobs`, {burst['terminal']} terminal ({burst['outcome']}) after "
        f"{burst['all_terminal_seconds']:.0f} s with one worker; {burst['not_terminal']} not terminal.",
        f"- setup: {meta['machine']}; CNF {CNF_SPEC['model']['hidden_dims']} trained "
        f"{meta['train_iterations']} iterations on moons through the service in {meta['train_seconds']:.0f} s.",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--train-iterations", type=int, default=CNF_SPEC["training"]["iterations"])
    parser.add_argument("--burst-timeout", type=float, default=900.0)
    parser.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="odeforge-load-") as tmp:
        data_dir = Path(tmp)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start_service(data_dir, port)
        try:
            with httpx.Client(base_url=base, timeout=60) as client:
                job_id, train_s = train_cnf(client, args.train_iterations)
            load = asyncio.run(log_density_load(base, job_id, args.clients, args.points, args.seconds))
            burst = asyncio.run(submission_burst(base, args.burst, 50, args.burst_timeout))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"{platform.python_version()}", "train_iterations": args.train_iterations,
            "train_seconds": train_s}
    print(markdown(load, burst, meta))
    if args.json:
        args.json.write_text(json.dumps({"load": load, "burst": burst, "meta": meta}, indent=2))
    lost = burst["accepted"] - burst["accepted_and_listed"] + burst["not_terminal"]
    return 1 if load["errors"] or lost or burst["accepted"] != burst["submitted"] else 0


if __name__ == "__main__":
    sys.exit(main())
