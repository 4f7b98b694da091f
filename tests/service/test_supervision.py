"""The restart policy of `odeforge serve`'s supervisor (issue 14: backoff, per-minute cap), on real
short-lived children. `odeforge serve` itself restarting its killed worker and redis-server is
tests/service/test_embedded.py (one serve process for the embedded tests)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

from service.embedded import Child, Supervisor


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

