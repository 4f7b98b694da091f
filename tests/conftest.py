"""Shared fixtures: real SQLite and PostgreSQL job stores, the real Redis broker, real Celery workers.

Isolation between parallel test runs on one machine:
- PostgreSQL: every test gets its own schema (``search_path`` in the URL), dropped afterwards.
- Redis: database ``TEST_REDIS_DB`` and a queue name unique to this run; its keys are deleted after.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from service.embedded import stop as stop_process  # SIGTERM, then SIGKILL after a grace period

REPO = Path(__file__).resolve().parents[1]
PG_DSN = os.environ.get("ODEFORGE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
TEST_REDIS_DB = int(os.environ.get("ODEFORGE_TEST_REDIS_DB", "13"))
RUN_ID = uuid.uuid4().hex[:10]


def _sqlalchemy_pg_url(schema: str) -> str:
    return PG_DSN.replace("postgresql://", "postgresql+psycopg://", 1) + f"?options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """SQLAlchemy URL of a fresh PostgreSQL schema (dropped after the test)."""
    import psycopg

    schema = f"odeforge_t_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    try:
        conn = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_DSN} is required (start it, see .ci/run): {exc}")
    with conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield _sqlalchemy_pg_url(schema)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        # Connections of the test's engines are closed by then; terminate stragglers to allow the drop.
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each contract test runs against SQLite and against the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def redis_client():
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=TEST_REDIS_DB, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis at {REDIS_HOST}:{REDIS_PORT} is required (start it, see .ci/run): {exc}")
    yield client
    client.close()


@pytest.fixture
def queue_name(redis_client) -> Iterator[str]:
    """A queue used by this test only; its Redis keys are removed afterwards."""
    name = f"odeforge-test-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    yield name
    redis_client.delete(name, f"_kombu.binding.{name}")


@pytest.fixture
def broker_url(redis_client) -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{TEST_REDIS_DB}"


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


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable]:
    """Start real Celery workers (``odeforge worker`` subprocesses) for given settings; stopped after the test."""
    procs: list[subprocess.Popen] = []

    def start(settings) -> subprocess.Popen:
        log = tmp_path / f"worker-{len(procs)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--name", f"test-{uuid.uuid4().hex[:6]}@%h"],
            env=settings_env(settings), cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        wait_for_line(log, " ready.", proc, timeout=90)
        proc.log_path = log  # type: ignore[attr-defined]
        return proc

    yield start
    for proc in procs:
        stop_process(proc)



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
