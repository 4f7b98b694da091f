"""`odeforge serve` supervises its worker and its redis-server (issue 14): kill -9 either, it comes
back (logged with the exit code), `/readyz` says not ready while the worker is gone, and new jobs
complete. Real processes throughout; plus the restart policy (backoff, per-minute cap) on real
short-lived children."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.embedded import Child, Supervisor
from tests.conftest import REPO, wait_for_job
from tests.service.test_embedded import _children, _free_port

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


@pytest.mark.slow
@pytest.mark.services
def test_serve_restarts_a_killed_worker_and_a_killed_broker(tmp_path: Path):
    data_dir, port, log_path = tmp_path / "data", _free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODEFORGE_")}
    # a 3 s backoff keeps the worker down past its heartbeat's 3 s staleness: /readyz must see it gone
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), ODEFORGE_SUPERVISE_BACKOFF_S="3")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                             "--data-dir", str(data_dir)], cwd=tmp_path, env=env, stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            _until(lambda: _status(client, "/readyz") == 200, 120, "ready", proc, log_path)
            worker, redis = _child(proc, "-m worker"), _child(proc, "redis-server")
            assert worker and redis

            os.kill(worker, signal.SIGKILL)
            not_ready = _until(lambda: (r := client.get("/readyz")).status_code == 503 and r.json(), 30,
                               "/readyz 503 after the worker died", proc, log_path)
            assert [e["field"] for e in not_ready["errors"]] == ["workers"]
            job = client.post("/v1/jobs", json=FAST).json()["id"]  # accepted while the worker is down
            new_worker = _until(lambda: (w := _child(proc, "-m worker")) and w != worker and w, 60,
                                "a new worker", proc, log_path)
            _until(lambda: _status(client, "/readyz") == 200, 90, "ready again", proc, log_path)
            assert wait_for_job(client, job, ("succeeded",), timeout=120)["step"] == 2
            text = log_path.read_text()
            assert "worker exited with code -9" in text and "worker restarted" in text

            os.kill(redis, signal.SIGKILL)
            _until(lambda: (r := _child(proc, "redis-server")) and r != redis, 60, "a new redis-server", proc, log_path)
            assert "redis-server exited with code -9" in log_path.read_text()
            job = _until(lambda: (r := client.post("/v1/jobs", json=FAST)).status_code == 202 and r.json()["id"],
                         60, "a submission accepted", proc, log_path)
            assert wait_for_job(client, job, ("succeeded",), timeout=180)["step"] == 2
            assert _child(proc, "-m worker") == new_worker  # the worker rode out the broker's restart
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert not _children(proc.pid)


# ---- the restart policy, on real short-lived processes ---------------------------------------------
def _sleeper(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time, sys; time.sleep({seconds}); sys.exit(3)"])


def test_backoff_doubles_and_restarts_are_capped_per_minute(caplog):
    clock = [0.0]
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        started.append(subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"]))
        started[-1].wait()
        return started[-1]

    child = Child("crasher", start, backoff_s=1.0, max_restarts=3, clock=lambda: clock[0])
    child.start()
    caplog.set_level(logging.INFO, logger="odeforge.serve")
    restarts_at = []
    for _ in range(400):  # 100 s in 0.25 s ticks
        n = len(started)
        child.check()
        if len(started) > n:
            restarts_at.append(clock[0])
        clock[0] += 0.25
    # each death is noticed at the next 0.25 s tick; it died young every time, so the backoffs are
    # 1, 2, 4 s (restarts at 1, 1.25 + 2, 3.5 + 4); the 4th (due at 7.75 + 8) waits for the cap:
    # 3 restarts within 60 s, until the first leaves the window at 1 + 60 s
    assert restarts_at[:4] == [1.0, 3.25, 7.5, 61.0]
    assert all(b - a >= 0 for a, b in zip(restarts_at, restarts_at[1:]))
    assert sum(1 for t in restarts_at if 30 <= t < 90) <= 3
    assert "crasher exited with code 3" in caplog.text and "ODEFORGE_SUPERVISE_MAX_RESTARTS" in caplog.text


def test_supervisor_restarts_a_real_child_and_stops_it_on_shutdown():
    child = Child("sleeper", lambda: _sleeper(0.3), backoff_s=0.1, max_restarts=100)
    child.start()
    first = child.proc
    sup = Supervisor([child], every_s=0.05)
    sup.start()
    try:
        deadline = time.monotonic() + 20
        while child.proc is first or len(child.restarts) < 2:
            assert time.monotonic() < deadline, "not restarted"
            time.sleep(0.05)
        assert first.returncode == 3
    finally:
        sup.shutdown()
    sup.join(5)
    last = child.proc
    assert last.poll() is not None  # stopped, and not started again
    time.sleep(0.3)
    assert child.proc is last

