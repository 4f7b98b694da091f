"""Configuration: one pydantic-settings class, read from ``ODEFORGE_*`` environment variables.

Every process (API, worker, CLI) reads the same class, so an embedded ``odeforge serve`` and a
production deployment differ only in environment variables. Nothing is read at import time:
:func:`get_settings` reads the environment on its first call and caches the result; tests either
build a ``Settings(...)`` and hand it over explicitly (``create_app(settings)``, ``WorkerContext``) or
wrap code in :func:`override_settings`. ``get_settings.cache_clear()`` makes the next call re-read
the environment (``odeforge worker --device`` sets a variable and does that).

Outside ``environment="development"`` unsafe values are refused when the settings are built
(:class:`pydantic.ValidationError` naming the variable): a SQLite job store, an in-process broker
transport, a relative artifact directory.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
MIN_KEY_LENGTH = 16
# Broker transports that live inside one process (or one machine's disk): API and workers in other
# processes or hosts would never see each other's messages.
_LOCAL_BROKERS = ("memory://", "filesystem://", "cache+memory://")


def parse_api_keys(raw: str | None) -> dict[str, str]:
    """``"alice:k1,bob:k2"`` / ``"k1,k2"`` -> ``{key: owner}`` (empty: authentication off).

    A bare key gets the owner ``key-<sha256 prefix>`` (the key itself is never stored).
    Raises ValueError for keys shorter than 16 characters, names outside 1-64 characters, or a
    key listed twice.
    """
    keys: dict[str, str] = {}
    for entry in (raw or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, key = entry.partition(":")
        if not sep:
            name, key = "key-" + hashlib.sha256(entry.encode()).hexdigest()[:16], entry
        name, key = name.strip(), key.strip()
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"API key for {name!r} is shorter than {MIN_KEY_LENGTH} characters")
        if not name or len(name) > 64:
            raise ValueError("API key names must be 1-64 characters")
        if key in keys:
            raise ValueError(f"API key listed twice (owners {keys[key]!r} and {name!r})")
        keys[key] = name
    return keys


class Settings(BaseSettings):
    """All knobs of the service and workers (env prefix ``ODEFORGE_``, e.g. ``ODEFORGE_DATABASE_URL``)."""

    model_config = SettingsConfigDict(env_prefix="ODEFORGE_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    # Job store (SQLAlchemy URL). SQLite by default; PostgreSQL in production.
    database_url: str = "sqlite:///odeforge-data/jobs.db"
    # Celery broker. Redis in production; `odeforge serve` points this at its own redis-server socket.
    broker_url: str = "redis://127.0.0.1:6379/0"
    # Queue the API publishes to and the workers consume (one name per deployment).
    queue: str = "odeforge"
    # Local artifact store root (checkpoints, uploaded data sets).
    artifact_dir: Path = Path("odeforge-data/artifacts")
    # Worker device: auto picks cuda when available, else cpu.
    device: str = "auto"

    # Longest job: a worker fails a job (JobTimeLimitExceeded, its last checkpoint kept) once it has
    # run this many wall-clock seconds (counted once its model and data are loaded, plus the training
    # time of earlier attempts it resumed from). The broker's visibility timeout is set above it so an unacked long
    # job is never handed to a second worker while the first one still trains it.
    max_job_seconds: int = Field(7 * 24 * 3600, ge=1)
    # How long the API waits for the broker before answering 503.
    broker_timeout_s: float = Field(3.0, gt=0, le=60)

    # Request limits.
    max_body_bytes: int = Field(80 * 1024 * 1024, ge=1024)  # above max_upload_bytes (multipart overhead)
    max_points: int = Field(10_000, ge=1)
    max_samples: int = Field(10_000, ge=1)
    # Posterior draws per series a forecast may ask for (latent models; each draw is one more solve
    # per series; draws x series x times also count towards max_points).
    max_forecast_samples: int = Field(100, ge=1, le=1000)
    max_predict_inputs: int = Field(256, ge=1)
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    page_limit_default: int = Field(50, ge=1)
    page_limit_max: int = Field(500, ge=1)

    # Inference: how many loaded checkpoints the API keeps in memory (LRU).
    inference_cache_size: int = Field(8, ge=1, le=1024)

    # Event stream (GET /v1/jobs/{id}/events): how often it polls the job store for new events, and
    # how often it sends a heartbeat comment while nothing happens (keeps proxies from closing it).
    events_poll_s: float = Field(1.0, gt=0, le=60)
    events_heartbeat_s: float = Field(15.0, gt=0, le=300)

    # ---- Inference and request bounds (issue 14; service/inference_pool.py, service/limits.py) ----
    # Threads that run inference (model loads, solves), apart from the threadpool other routes use.
    inference_workers: int = Field(2, ge=1, le=64)
    # Inference requests admitted beyond the running ones; the next is a 503 `inference-busy` with Retry-After.
    inference_queue: int = Field(16, ge=0, le=10_000)
    # Wall-clock budget of one inference request (s): its solves stop, 503 `inference-timeout`.
    inference_timeout_s: float = Field(30.0, gt=0, le=3600)
    # Field evaluations allowed per ODE solve of an inference request (each CNF block is one solve);
    # a point needing more gets null with reason `nfe_budget` (log-density) or a 422 `inference-budget-exceeded`.
    inference_max_nfe: int = Field(100_000, ge=1, le=100_000_000)
    # Request bodies other than multipart uploads (JSON) are refused beyond this (413); uploads keep
    # max_body_bytes. Large JSON bodies are parsed off the event loop, one at a time.
    max_json_bytes: int = Field(8 * 1024 * 1024, ge=1024)

    # Worker lease: a claim is valid this long and renewed by a heartbeat every third of it (seconds).
    lease_s: float = Field(600.0, ge=5.0, le=86_400.0)
    # Worker: how often (seconds) the training loop re-reads the job row for a cancel request.
    cancel_poll_s: float = Field(0.5, ge=0.0, le=60)
    # A job whose worker was lost this many times (lease expired: killed, OOM, hung) fails as a poison job.
    max_attempts: int = Field(3, ge=1, le=100)
    # The API's reconciler: how often it requeues jobs with expired leases, and after how long a queued
    # job whose message the broker lost (restart without persistence) is published again (seconds).
    reconcile_every_s: float = Field(15.0, gt=0, le=3600)
    requeue_queued_after_s: float = Field(300.0, ge=0, le=86_400)

    # ---- storage and supervision (issue 14; docs/architecture.md "Storage and supervision") ----
    # Bytes one owner (API key) may keep: uploaded data sets plus the checkpoints of its jobs. An upload
    # that would pass it, or a submission while it is passed, is a 507 quota-exceeded. 0 = no quota.
    owner_quota_bytes: int = Field(10 * 2**30, ge=0)
    # Periodic checkpoints kept per job (the newest k, plus final.safetensors); older ones are deleted
    # as new ones land. At least 1: a requeued job resumes from the newest.
    checkpoint_keep: int = Field(3, ge=1, le=100_000)
    # Free bytes the artifact disk must keep: below it uploads and submissions are a 507
    # insufficient-storage (room stays for running jobs' checkpoints) and /readyz is 503.
    min_free_bytes: int = Field(256 * 2**20, ge=0)
    # Worker liveness: each worker process writes a heartbeat row this often (seconds); one older than
    # three periods is a dead worker. /readyz is 503 while no live worker consumes this queue, unless
    # ready_requires_worker is off (an API scaled apart from its workers).
    worker_heartbeat_s: float = Field(5.0, ge=0.05, le=600)
    ready_requires_worker: bool = True
    # `odeforge serve` restarts a dead worker or redis-server after a backoff (doubling from
    # supervise_backoff_s up to 30 s), at most supervise_max_restarts times per minute per process;
    # past that it stops restarting it (logged) and /readyz stays 503.
    supervise_backoff_s: float = Field(1.0, ge=0.0, le=60)
    supervise_max_restarts: int = Field(5, ge=1, le=1000)

    # ---- compute bounds per job and per owner (issue 14) -----------------------------------------
    # Largest estimated cost a submission may have (node_engine.cost: parameters x state size x
    # per-sample field evaluations of training and evaluation); above it the API answers 422
    # `job-too-costly` naming the estimate. 1e18 admits every example of the project (the largest,
    # odenet on MNIST for 10 epochs, is ~6e15) and refuses a spec at the maximum of every field.
    max_job_cost: float = Field(1e18, gt=0)
    # NFE budget of each ODE solve of a job's training and evaluation (node_engine's
    # options["max_nfe"]); a solve that needs more fails the job with NFEBudgetExceeded. Legitimate
    # solves take 10^2-10^4 evaluations.
    max_nfe_per_solve: int = Field(1_000_000, ge=1)
    # Whether training solves may use a compiled trial step (a spec's solver.compile: auto/on/off;
    # issue 17): false for machines without a C++ compiler for Inductor, or where a first compile's
    # seconds-to-minutes per job are not worth it (the test suite's short jobs).
    solver_compile: bool = True
    # Resident memory (MiB) a worker process may reach while it runs a job, checked every
    # cancel_poll_s inside the training loop and every solve; above it the job fails with
    # MemoryLimitExceeded (its last checkpoint kept) and the worker takes the next job.
    # 0: 80% of the machine's physical memory (with several workers per host, set RAM / workers).
    max_worker_memory_mb: int = Field(0, ge=0)
    # Running jobs one API-key owner may hold at once; a worker that takes a message for an owner at
    # the limit leaves the job queued and republishes it after owner_retry_s (so another owner's job
    # runs meanwhile; an owner's own jobs still start in submission order). 0: no limit. Jobs
    # without an owner (authentication off: one tenant) are not limited.
    max_running_per_owner: int = Field(4, ge=0)
    owner_retry_s: float = Field(2.0, gt=0, le=600)

    # API keys ("name:key,name2:key2" or bare keys); unset = no authentication (see service/auth.py).
    api_keys: SecretStr | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError("device must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, v: SecretStr | None) -> SecretStr | None:
        parse_api_keys(v.get_secret_value() if v is not None else None)  # fail at start, not per request
        return v

    @model_validator(mode="after")
    def _body_fits_upload(self) -> "Settings":
        if self.max_body_bytes < self.max_upload_bytes:
            raise ValueError("ODEFORGE_MAX_BODY_BYTES must be at least ODEFORGE_MAX_UPLOAD_BYTES")
        return self

    @model_validator(mode="after")
    def _production_is_safe(self) -> "Settings":
        """Refuse values that only work on one machine, for one process, when not in development."""
        if self.environment == "development":
            return self
        if self.database_url.startswith("sqlite"):
            # SQLite is the embedded default; several API/worker hosts need a real database server.
            raise ValueError("ODEFORGE_DATABASE_URL must be a server database (PostgreSQL) in production")
        if self.broker_url.startswith(_LOCAL_BROKERS):
            raise ValueError(f"ODEFORGE_BROKER_URL {self.broker_url.split('://')[0]}:// only reaches this process; "
                             "use a Redis URL in production")
        if not self.artifact_dir.is_absolute():
            raise ValueError("ODEFORGE_ARTIFACT_DIR must be an absolute path in production (API and workers "
                             "mount one volume at the same place)")
        return self

    @property
    def api_key_owners(self) -> dict[str, str]:
        """``{key: owner}`` from ``api_keys`` (empty: authentication off)."""
        return parse_api_keys(self.api_keys.get_secret_value() if self.api_keys is not None else None)

    @property
    def visibility_timeout(self) -> int:
        """Broker visibility timeout in seconds (longer than the longest job)."""
        return self.max_job_seconds + 3600


_override: list[Settings] = []  # innermost override_settings() last


@lru_cache(maxsize=1)
def _from_environment() -> Settings:
    return Settings()


def get_settings() -> Settings:
    """The process-wide settings: the innermost :func:`override_settings`, else the environment (read once).

    Raises pydantic's ``ValidationError`` (naming the ``ODEFORGE_*`` variable) for invalid values.
    """
    return _override[-1] if _override else _from_environment()


get_settings.cache_clear = _from_environment.cache_clear  # type: ignore[attr-defined]


@contextmanager
def override_settings(settings: Settings) -> Iterator[Settings]:
    """Make :func:`get_settings` return ``settings`` inside the ``with`` block (tests)."""
    _override.append(settings)
    try:
        yield settings
    finally:
        _override.remove(settings)
