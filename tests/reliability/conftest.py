"""Fixtures of the reliability tests: private servers we may kill, and several real workers at once.

The shared Redis (127.0.0.1:6379) and PostgreSQL are never stopped here. Broker outages use a
``redis-server`` this test starts on a free port and kills; database outages use a PostgreSQL
database this test creates, closes to connections (``ALLOW_CONNECTIONS false`` plus
``pg_terminate_backend`` of *its* sessions only) and drops afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.conftest import PG_DSN, REPO, RUN_ID, settings_env, stop_process, wait_for_line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(settings) -> dict[str, str]:
    """``settings_env`` plus the lease/attempt settings the fault tests shorten."""
    env = settings_env(settings)
    env.update(
        ODEFORGE_LEASE_S=str(settings.lease_s),
        ODEFORGE_MAX_ATTEMPTS=str(settings.max_attempts),
        ODEFORGE_BROKER_TIMEOUT_S=str(settings.broker_timeout_s),
    )
    return env


@pytest.fixture
def start_workers(tmp_path: Path) -> Iterator[Callable]:
    """Start ``n`` real ``odeforge worker`` processes at once (imports overlap), wait until all are ready."""
    procs: list[subprocess.Popen] = []

    def start(settings, n: int = 1) -> list[subprocess.Popen]:
        new = []
        for _ in range(n):
            log = tmp_path / f"worker-{len(procs)}.log"
            proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "worker", "--name", f"rel-{uuid.uuid4().hex[:6]}@%h"],
                env=worker_env(settings), cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
            )
            proc.log_path = log  # type: ignore[attr-defined]
            procs.append(proc)
            new.append(proc)
        for proc in new:
            wait_for_line(proc.log_path, " ready.", proc, timeout=120)
        return new

    yield start
    for proc in procs:
        if proc.poll() is None:
            with _suppress():
                os.kill(proc.pid, signal.SIGCONT)  # a frozen worker cannot handle SIGTERM
        stop_process(proc)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


class RedisServer:
    """A private redis-server (no persistence: a restart loses every message, like a crashed broker)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.workdir)],
            stdout=open(self.workdir / "redis.log", "ab"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self):
        import redis

        return redis.Redis(port=self.port, socket_connect_timeout=1)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


class PrivateDatabase:
    """A PostgreSQL database of this test alone, which it may close to connections and reopen."""

    def __init__(self) -> None:
        self.name = f"odeforge_rel_{RUN_ID}_{uuid.uuid4().hex[:6]}"
        base = PG_DSN.rsplit("/", 1)[0]
        self.dsn = f"{base}/{self.name}"
        self.url = self.dsn.replace("postgresql://", "postgresql+psycopg://", 1)

    def _admin(self):
        import psycopg

        return psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5)

    def create(self) -> None:
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')

    def go_down(self) -> None:
        """Refuse new connections and drop the existing ones (this database's only)."""
        with self._admin() as conn:
            conn.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (self.name,))

    def come_back(self) -> None:
        with self._admin() as conn:
            conn.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')

    def drop(self) -> None:
        with self._admin() as conn:
            conn.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (self.name,))
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}"')


@pytest.fixture
def private_database() -> Iterator[PrivateDatabase]:
    db = PrivateDatabase()
    try:
        db.create()
    except Exception as exc:
        pytest.fail(f"PostgreSQL at {PG_DSN} is required (start it, see .ci/run): {exc}")
    yield db
    db.drop()


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"not within {timeout} s: {what}")


def log_text(proc) -> str:
    return Path(proc.log_path).read_text(errors="replace")
