"""Shared fixtures: real SQLite and PostgreSQL job stores, the real Redis broker, real Celery workers.

Servers (``tests/servers.py``): the machine's PostgreSQL and Redis when they answer on their default
ports (CI), private ones started for the session otherwise (a fresh machine needs nothing but
Python); ``ODEFORGE_TEST_DATABASE_URL`` / ``ODEFORGE_TEST_REDIS_URL`` pick others. A server is only
chosen (and started) when a test first asks for it.

Tiers: every test that uses a server fixture (PostgreSQL, Redis, a worker process) is marked
``services`` at collection, plus ``postgres``/``redis``, so ``pytest -m "not services"`` is the fast
tier that needs and touches no server.

Isolation between parallel test runs on one machine:
- PostgreSQL: every test gets its own schema (``search_path`` in the URL), dropped afterwards.
- Redis: database ``TEST_REDIS_DB`` and a queue name unique to this run; its keys are deleted after.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.servers import Choice, postgres_choice, redacted, redis_choice, sqlalchemy_url

REPO = Path(__file__).resolve().parents[1]
RUN_ID = uuid.uuid4().hex[:10]

# --- tiers: markers derived from the fixtures a test uses -------------------------------------------

# A test whose fixture closure contains one of these needs that server (transitively: `make_settings`
# needs `redis_url` through `broker_url`, so it is covered by `redis_url`).
SERVER_FIXTURES = {
    "postgres_dsn": "postgres",
    "redis_url": "redis",
    "private_redis": "redis",  # a redis-server process of the test's own
    "start_worker": "services",  # Celery worker processes
    "start_workers": "services",
}
SERVER_MARKERS = ("postgres", "redis", "services")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs a server ``services`` (and ``postgres``/``redis``), from its fixtures.

    The ``postgresql`` case of ``database_url`` carries its mark as a parameter mark (its ``pg_url``
    is requested at run time, outside the static fixture closure).
    """
    for item in items:
        needs = {SERVER_FIXTURES[name] for name in getattr(item, "fixturenames", ()) if name in SERVER_FIXTURES}
        needs |= {m for m in SERVER_MARKERS if item.get_closest_marker(m) is not None}
        for name in sorted(needs | ({"services"} if needs else set())):
            if item.get_closest_marker(name) is None:
                item.add_marker(name)


# --- servers ------------------------------------------------------------------------------------

SERVERS_USED: dict[str, Choice] = {}
_RUNNING: list[pytest.Item] = []  # the test being set up, for the tier guard below


@pytest.hookimpl(tryfirst=True)  # before pytest's own setup, which sets up the test's fixtures
def pytest_runtest_setup(item: pytest.Item) -> None:
    _RUNNING[:] = [item]


def _guard_tier(kind: str) -> None:
    """Fail a test that reaches a server without being marked ``services`` (a fixture requested at
    run time through ``request.getfixturevalue``, outside the closure the markers come from), so the
    fast tier can never quietly start or use a server."""
    if _RUNNING and _RUNNING[0].get_closest_marker("services") is None:
        pytest.fail(f"{_RUNNING[0].nodeid} uses {kind} but is not marked `services`: request the server "
                    "fixture as an argument, or mark the test (or its parameter) with pytest.mark.postgres/redis")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """One line naming the servers this session used (before pytest's closing line)."""
    parts = []
    for kind in ("PostgreSQL", "Redis"):
        choice = SERVERS_USED.get(kind)
        if choice is None:
            parts.append(f"{kind}: not used")
        else:
            parts.append(f"{kind}: {choice.source}" + (f" ({choice.detail})" if choice.detail else ""))
    terminalreporter.write_line("test servers: " + "; ".join(parts))


@contextmanager
def _session_server(kind: str, choose: Callable[[], tuple[Choice, object]]) -> Iterator[str]:
    """Choose (maybe start) the session's ``kind`` server; yields its URL, stops a private one after."""
    _guard_tier(kind)
    choice, private = choose()
    SERVERS_USED[kind] = choice
    try:
        yield choice.url
    finally:
        if private is not None:
            private.stop()


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """libpq URI of the session's PostgreSQL database (tests create schemas and databases in it)."""
    with _session_server("PostgreSQL", postgres_choice) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's Redis database."""
    with _session_server("Redis", lambda: redis_choice(tmp_path_factory.mktemp("redis"))) as url:
        yield url


@contextmanager
def pg_schema(postgres_dsn: str) -> Iterator[str]:
    """SQLAlchemy URL of a fresh PostgreSQL schema, dropped on exit."""
    import psycopg

    schema = f"odeforge_t_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    try:
        conn = psycopg.connect(postgres_dsn, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {redacted(postgres_dsn)} refused the tests ({exc}); set "
                    "ODEFORGE_TEST_DATABASE_URL to a database they may create schemas in")
    with conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield sqlalchemy_url(postgres_dsn, schema=schema)
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pg_url(postgres_dsn: str) -> Iterator[str]:
    """SQLAlchemy URL of a fresh PostgreSQL schema (dropped after the test)."""
    with pg_schema(postgres_dsn) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each contract test runs against SQLite and against the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def redis_client(redis_url: str):
    import redis

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis at {redacted(redis_url)} refused the tests ({exc}); set ODEFORGE_TEST_REDIS_URL")
    yield client
    client.close()


@pytest.fixture
def queue_name(redis_client) -> Iterator[str]:
    """A queue used by this test only; its Redis keys are removed afterwards."""
    name = f"odeforge-test-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    yield name
    redis_client.delete(name, f"_kombu.binding.{name}")


@pytest.fixture
def broker_url(redis_url: str, redis_client) -> str:
    return redis_url


@pytest.fixture
def make_settings(tmp_path: Path, broker_url: str, queue_name: str) -> Callable[..., "Settings"]:  # noqa: F821
    from jobs.settings import Settings

    def make(**overrides):
        values = dict(
            database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
            broker_url=broker_url,
            queue=queue_name,
            artifact_dir=tmp_path / "artifacts",
            device="cpu",
            broker_timeout_s=2.0,
            cancel_poll_s=0.05,
            # most tests run the API without a worker; tests/reliability/test_storage.py checks the worker check
            ready_requires_worker=False,
        )
        values.update(overrides)
        return Settings(**values)

    return make


def settings_env(settings) -> dict[str, str]:
    """Environment that gives a subprocess the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODEFORGE_")}
    env.update(
        ODEFORGE_DATABASE_URL=settings.database_url,
        ODEFORGE_BROKER_URL=settings.broker_url,
        ODEFORGE_QUEUE=settings.queue,
        ODEFORGE_ARTIFACT_DIR=str(settings.artifact_dir),
        ODEFORGE_DEVICE=settings.device,
        ODEFORGE_CANCEL_POLL_S=str(settings.cancel_poll_s),
        OMP_NUM_THREADS="1",  # the test machine has 2 cores shared with the API and pytest
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def wait_for_line(path: Path, needle: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {needle!r}:\n{text[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"no {needle!r} within {timeout} s in {path}:\n{path.read_text(errors='replace')[-3000:]}")


def spawn_worker(settings, log: Path, timeout: float = 90) -> subprocess.Popen:
    """A real ``odeforge worker`` subprocess for ``settings`` (``settings_env``), its output in ``log``;
    returned once it logs that it is ready (else killed, and the error raised)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker", "--name", f"test-{uuid.uuid4().hex[:6]}@%h"],
        env=settings_env(settings), cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    proc.log_path = log  # type: ignore[attr-defined]
    try:
        wait_for_line(log, " ready.", proc, timeout=timeout)
    except BaseException:
        kill_worker(proc)
        raise
    return proc


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable]:
    """Start real Celery workers (``odeforge worker`` subprocesses) for given settings; stopped after the test."""
    procs: list[subprocess.Popen] = []

    def start(settings) -> subprocess.Popen:
        procs.append(spawn_worker(settings, tmp_path / f"worker-{len(procs)}.log"))
        return procs[-1]

    yield start
    for proc in procs:
        kill_worker(proc)


def kill_worker(proc: subprocess.Popen) -> None:
    """End a test's worker at teardown with SIGKILL: its job (if any) no longer matters, and Celery's
    warm shutdown costs 3-6 s a worker. The warm shutdown itself is tested on purpose
    (tests/service/test_e2e_worker.py's SIGTERM test, `odeforge serve` stopping its children)."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):  # it may have exited since
            os.kill(proc.pid, signal.SIGCONT)  # a frozen (SIGSTOPped) worker: woken, then killed
        proc.kill()
    proc.wait(30)



def wait_for_job(client, job_id: str, statuses: tuple[str, ...], timeout: float = 120.0, pred=None) -> dict:
    """Poll ``GET /v1/jobs/{id}`` until its status is in ``statuses`` (and ``pred(job)`` holds)."""
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses and (pred is None or pred(job)):
            return job
        if job["status"] in ("succeeded", "failed", "cancelled") and job["status"] not in statuses:
            raise AssertionError(f"job ended {job['status']} while waiting for {statuses}: {job}")
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} not in {statuses} after {timeout} s: {job}")
