"""SQLAlchemy 2 tables of the job store and the engine factory (shared by the API and the workers).

The job store is the source of truth for a job's status (not Celery's result backend). Tables:

- ``jobs``: one row per submitted job (spec, status, progress, latest metrics, error, timestamps,
  the worker's fencing ``token`` and ``attempts`` counter).
- ``job_metrics``: one row per logged training step (loss, NFE, ...), evaluation values merged in.
- ``datasets``: uploaded arrays (the array itself lives in the artifact store).
- ``job_events``: each job's event log (status changes, metric rows, evaluations, checkpoints, the
  result), appended in the transaction of the write it describes; ``GET /v1/jobs/{id}/events``
  streams it by ``id`` (:mod:`jobs.events`).
- ``job_tags``: one row per tag of a job (``tags`` of the spec), so ``?tag=`` filters in SQL.

New tables are created on start in an existing database too (``create_all`` adds missing tables;
no column was added to an existing table, so no migration is needed).

The schema is created on start (``init_db``). SQLite gets WAL mode and a busy timeout because the
API and the worker write to the same file.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from jobs.status import JobStatus


def utcnow() -> datetime:
    """Timezone-aware current time in UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timestamp stored in UTC and always returned timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    pass


class Job(Base):
    """A training job. ``seq`` orders jobs for keyset pagination; ``id`` is the public name."""

    __tablename__ = "jobs"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    # VARCHAR(16) holding the enum's values ("queued", ...), exactly the strings stored before the enum;
    # rows read back as JobStatus members.
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]), index=True)
    spec: Mapped[dict] = mapped_column(JSON)
    model_type: Mapped[str] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)  # latest values
    error_type: Mapped[str | None] = mapped_column(String(128), nullable=True)
    error_detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Fencing token: bumped each time a worker claims the job; every worker write is conditioned
    # on it, so a stale worker (one whose claim was superseded) cannot overwrite a newer one.
    token: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Renewed by every worker write; a running job whose lease has expired has lost its worker.
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class JobMetric(Base):
    """One logged training step of a job (``values``: loss, nfe_forward, ... and eval results)."""

    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_seq", "step", name="uq_job_metrics_step"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_seq: Mapped[int] = mapped_column(ForeignKey("jobs.seq", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict] = mapped_column(JSON)


class JobEvent(Base):
    """One event of a job's log (``type``: status, metric, evaluation, checkpoint, result; ``data``: its JSON).

    ``id`` is the stream position (SSE ``id:``): every event of a job is appended while its writer
    holds the job row (a fenced UPDATE or SELECT ... FOR UPDATE first), so a job's events commit in
    ``id`` order and a reader polling ``id > last`` loses none, on SQLite and PostgreSQL alike.
    """

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_seq: Mapped[int] = mapped_column(ForeignKey("jobs.seq", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobTag(Base):
    """One tag of a job (the spec's ``tags``), kept apart so ``GET /v1/jobs?tag=`` is an indexed SQL filter."""

    __tablename__ = "job_tags"

    job_seq: Mapped[int] = mapped_column(ForeignKey("jobs.seq", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class Dataset(Base):
    """An uploaded data set: an (N, D) float array stored as ``datasets/{id}.npy`` in the artifact store."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    shape: Mapped[list] = mapped_column(JSON)
    filename: Mapped[str | None] = mapped_column(String(255), nullable=True)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def make_engine(url: str, *, idle_in_transaction_timeout_s: float | None = None) -> Engine:
    """An engine for ``url``; SQLite gets WAL + busy timeout, servers get pre-ping (dropped connections).

    ``idle_in_transaction_timeout_s`` (PostgreSQL): the server ends a session that sits inside a
    transaction longer than this. Workers set it to half their lease: a worker frozen between an
    UPDATE and its COMMIT (SIGSTOP, a paused VM) would otherwise hold the job row's lock for as
    long as it is frozen, and the reconciler could not requeue that job.
    """
    if url.startswith("sqlite"):
        db_path = make_url(url).database
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    if idle_in_transaction_timeout_s and engine.dialect.name == "postgresql":
        timeout_ms = max(1000, int(idle_in_transaction_timeout_s * 1000))

        @event.listens_for(engine, "connect")
        def _session_timeouts(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute(f"SET idle_in_transaction_session_timeout = {timeout_ms}")
            cur.close()
            dbapi_conn.commit()  # the SET outlives this transaction; do not leave it open

    return engine


def init_db(engine: Engine) -> None:
    """Create the tables that do not exist yet (idempotent; safe with several processes starting)."""
    try:
        Base.metadata.create_all(engine, checkfirst=True)
    except DBAPIError:
        # Another process (API or worker) created the same tables between our check and CREATE.
        Base.metadata.create_all(engine, checkfirst=True)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    """Sessions whose objects stay readable after commit (rows are handed to routes and workers)."""
    return sessionmaker(engine, expire_on_commit=False)
