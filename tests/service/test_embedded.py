"""The embedded default: `odeforge serve` (API + worker + private redis-server, SQLite) as a subprocess."""

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


def test_odeforge_serve_runs_a_job_end_to_end(tmp_path: Path):
    data_dir = tmp_path / "data"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODEFORGE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                             "--data-dir", str(data_dir)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    children: list[int] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "odeforge serve did not become ready"
                time.sleep(0.3)
            children = _children(proc.pid)
            assert len(children) == 2  # redis-server and the worker

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

        # Everything lives under the data directory.
        assert (data_dir / "jobs.db").is_file()
        assert (data_dir / "artifacts" / "jobs" / job["id"] / "checkpoints" / "final.safetensors").is_file()
        assert (data_dir / "redis" / "appendonly.aof").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    # A clean stop takes the worker and the broker with it.
    time.sleep(0.5)
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
