"""Fixtures of the reliability tests: private servers we may kill, and several real workers at once.

The session's Redis and PostgreSQL (``tests/servers.py``) are never stopped here. Broker outages use
a ``redis-server`` this test starts on a free port and kills; database outages use a PostgreSQL
database this test creates on the session's server, closes to connections (``ALLOW_CONNECTIONS
false`` plus ``pg_terminate_backend`` of *its* sessions only) and drops afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.conftest import REPO, RUN_ID, _guard_tier, kill_worker, settings_env, wait_for_line
from tests.servers import RedisServer, libpq_dsn, redacted, sqlalchemy_url


def worker_env(settings) -> dict[str, str]:
    """``settings_env`` plus the lease/attempt settings the fault tests shorten."""
    env = settings_env(settings)
    env.update(
        ODEFORGE_LEASE_S=str(settings.lease_s),
        ODEFORGE_MAX_ATTEMPTS=str(settings.max_attempts),
        ODEFORGE_BROKER_TIMEOUT_S=str(settings.broker_timeout_s),
        # compute bounds (tests/reliability/test_compute_limits.py)
        ODEFORGE_MAX_JOB_SECONDS=str(settings.max_job_seconds),
        ODEFORGE_MAX_WORKER_MEMORY_MB=str(settings.max_worker_memory_mb),
        ODEFORGE_MAX_NFE_PER_SOLVE=str(settings.max_nfe_per_solve),
        ODEFORGE_MAX_RUNNING_PER_OWNER=str(settings.max_running_per_owner),
        ODEFORGE_OWNER_RETRY_S=str(settings.owner_retry_s),
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
        kill_worker(proc)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    _guard_tier("a private redis-server")
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


class PrivateDatabase:
    """A PostgreSQL database of this test alone, which it may close to connections and reopen.

    ``admin_dsn``: the session's server (``postgres_dsn``), connected to as a role that may create
    databases and terminate their sessions.
    """

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.name = f"odeforge_rel_{RUN_ID}_{uuid.uuid4().hex[:6]}"
        self.dsn = libpq_dsn(admin_dsn, database=self.name)
        self.url = sqlalchemy_url(admin_dsn, database=self.name)

    def _admin(self):
        import psycopg

        return psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=5)

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
def private_database(postgres_dsn: str) -> Iterator[PrivateDatabase]:
    db = PrivateDatabase(postgres_dsn)
    try:
        db.create()
    except Exception as exc:
        pytest.fail(f"could not create a database on the PostgreSQL at {redacted(postgres_dsn)}: {exc}")
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
