"""The embedded default: `odeforge serve` (API + worker + private redis-server, SQLite) as a subprocess.

One `odeforge serve` process (starting one and training its first job is most of such a test's time)
runs a job end to end through the CLI, and supervises its worker and its redis-server (issue 14):
kill -9 either, it comes back (logged with the exit code), `/readyz` says not ready while the worker is
gone, and new jobs complete. The restart policy alone: tests/service/test_supervision.py."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, wait_for_job

pytestmark = [pytest.mark.slow, pytest.mark.services]  # `odeforge serve`: its own redis-server and worker

TINY_CNF = {
    "model": {"type": "cnf", "hidden_dims": [8, 8]},
    "dataset": {"name": "8gaussians", "n_samples": 256},
    "training": {"iterations": 4, "batch_size": 64, "eval_every": 4, "checkpoint_every": 2},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


FAST = {"model": {"type": "planar", "num_layers": 2}, "dataset": {"name": "moons", "n_samples": 256},
        "training": {"iterations": 2, "batch_size": 32, "eval_every": 2, "checkpoint_every": 2}}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _child(proc: subprocess.Popen, needle: str) -> int | None:
    pids = [p for p in _children(proc.pid) if needle in _cmdline(p)]
    return pids[0] if pids else None


def _until(pred, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s; serve log:\n{log.read_text()[-3000:]}")


def _status(client: httpx.Client, path: str) -> int:
    try:
        return client.get(path).status_code
    except httpx.TransportError:
        return 0


def test_odeforge_serve_runs_a_job_end_to_end_and_restarts_a_killed_worker_and_broker(tmp_path: Path):
    data_dir, port, log_path = tmp_path / "data", _free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODEFORGE_")}
    # a 3 s backoff keeps the worker down past its heartbeat's 3 s staleness: /readyz must see it gone
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), ODEFORGE_SUPERVISE_BACKOFF_S="3")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                             "--data-dir", str(data_dir)], cwd=tmp_path, env=env, stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT)
    children: list[int] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            _until(lambda: _status(client, "/readyz") == 200, 120, "ready", proc, log_path)
            assert len(_children(proc.pid)) == 2  # redis-server and the worker

            # The people's CLI: `odeforge submit spec.json --wait`, then `odeforge status ID`.
            spec = tmp_path / "spec.json"
            spec.write_text(json.dumps(TINY_CNF))
            cli = [sys.executable, "-m", "service.cli"]
            url = ["--url", f"http://127.0.0.1:{port}"]
            out = subprocess.run([*cli, "submit", str(spec), "--wait", *url], env=env, capture_output=True,
                                 text=True, timeout=240)
            assert out.returncode == 0, out.stdout + out.stderr
            job_id = re.search(r"job ([0-9a-f]{32}) queued", out.stdout).group(1)
            job = wait_for_job(client, job_id, ("succeeded",), timeout=10)
            assert job["metrics"]["test_nll"] > 0 and job["step"] == 4
            status = subprocess.run([*cli, "status", job_id, "--json", *url], env=env, capture_output=True,
                                    text=True, timeout=60)
            assert status.returncode == 0 and json.loads(status.stdout)["status"] == "succeeded"
            missing = subprocess.run([*cli, "status", "f" * 32, *url], env=env, capture_output=True, text=True,
                                     timeout=60)
            assert missing.returncode == 1 and missing.stderr.startswith("error: 404 job not found")

            dens = client.post(f"/v1/jobs/{job['id']}/log-density", json={"points": [[0.0, 0.0], [2.0, 2.0]]}).json()
            assert len(dens["log_density"]) == 2 and all(math.isfinite(v) for v in dens["log_density"])
            samples = client.post(f"/v1/jobs/{job['id']}/samples", json={"n": 10, "seed": 0}).json()["samples"]
            assert len(samples) == 10 and all(len(s) == 2 for s in samples)

            # Supervision: the worker killed -9 comes back; meanwhile /readyz names it and submissions wait.
            worker, redis = _child(proc, "-m worker"), _child(proc, "redis-server")
            assert worker and redis
            os.kill(worker, signal.SIGKILL)
            not_ready = _until(lambda: (r := client.get("/readyz")).status_code == 503 and r.json(), 30,
                               "/readyz 503 after the worker died", proc, log_path)
            assert [e["field"] for e in not_ready["errors"]] == ["workers"]
            queued = client.post("/v1/jobs", json=FAST).json()["id"]  # accepted while the worker is down
            new_worker = _until(lambda: (w := _child(proc, "-m worker")) and w != worker and w, 60,
                                "a new worker", proc, log_path)
            _until(lambda: _status(client, "/readyz") == 200, 90, "ready again", proc, log_path)
            assert wait_for_job(client, queued, ("succeeded",), timeout=120)["step"] == 2
            text = log_path.read_text()
            assert "worker exited with code -9" in text and "worker restarted" in text

            # ... and so does the broker, under the same (restarted) worker.
            os.kill(redis, signal.SIGKILL)
            _until(lambda: (r := _child(proc, "redis-server")) and r != redis, 60, "a new redis-server", proc, log_path)
            assert "redis-server exited with code -9" in log_path.read_text()
            queued = _until(lambda: (r := client.post("/v1/jobs", json=FAST)).status_code == 202 and r.json()["id"],
                            60, "a submission accepted", proc, log_path)
            assert wait_for_job(client, queued, ("succeeded",), timeout=180)["step"] == 2
            assert _child(proc, "-m worker") == new_worker  # the worker rode out the broker's restart
            children = _children(proc.pid)
            assert len(children) == 2

        # Everything lives under the data directory.
        assert (data_dir / "jobs.db").is_file()
        assert (data_dir / "artifacts" / "jobs" / job["id"] / "checkpoints" / "final.safetensors").is_file()
        assert (data_dir / "redis" / "appendonly.aof").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    # A clean stop takes the worker and the broker with it.
    assert not _children(proc.pid)
    time.sleep(0.5)
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
