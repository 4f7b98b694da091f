"""Run one training job: job store -> node_engine trainer -> job store + artifact store.

``run_job`` is what the Celery task calls; it is idempotent per job id: a finished or cancelled job
is skipped, a redelivered job resumes from its newest checkpoint (its metric rows past that step are
dropped first, so the history has neither gaps nor duplicated steps), and every write is fenced by
the token ``claim`` returned.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from jobs.artifacts import (
    UPLOAD_SUFFIXES,
    ArtifactStore,
    LocalArtifactStore,
    checkpoint_key,
    dataset_key,
    latest_checkpoint,
    save_checkpoint,
)
from jobs.leases import LeaseKeeper
from jobs.settings import Settings, get_settings
from jobs.status import JobStatus
from jobs.store import JobStore
from jobs.tables import Job
from worker.guard import JobGuard, JobTimeLimitExceeded, MemoryLimitExceeded, memory_limit_bytes

log = logging.getLogger("odeforge.worker")

# Database outages (connection refused or dropped, pool exhausted) are not job failures.
_STORE_ERRORS = (OperationalError, InterfaceError, PoolTimeoutError)
FLUSH_SECONDS = 1.0  # metric rows are written in batches at most this far apart
FLUSH_ROWS = 200

# Set when this worker process is asked to shut down (SIGTERM): the running job stops at its next
# step, saves a checkpoint and goes back to the queue instead of being lost or run to its end.
_shutdown = threading.Event()


def request_shutdown() -> None:
    _shutdown.set()


@dataclass
class WorkerContext:
    settings: Settings
    store: JobStore
    artifacts: ArtifactStore

    @property
    def device(self) -> str:
        if self.settings.device != "auto":
            return self.settings.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache
def worker_context() -> WorkerContext:
    """Stores of this worker process, built once from the environment (schema created on start)."""
    settings = get_settings()
    # a transaction left open for half the lease (a frozen worker) is ended by the server, so its
    # row locks are gone before the lease can expire and the reconciler requeues the job
    store = JobStore.from_settings(settings, idle_in_transaction_timeout_s=settings.lease_s / 2)
    return WorkerContext(settings, store, LocalArtifactStore(settings.artifact_dir))


def _jsonable(value: Any) -> Any:
    """Python scalars for the JSON columns: tensors/numpy -> float/int, NaN/inf -> None."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    try:
        return _jsonable(float(value))
    except (TypeError, ValueError):
        return str(value)


def _make_callbacks(ctx: WorkerContext, job: Job, token: int, trainer: Any, guard: JobGuard) -> Any:
    from node_engine.training import TrainingCallbacks

    class JobCallbacks(TrainingCallbacks):
        """Streams step records and eval results into the job store, checkpoints into the artifact store."""

        def __init__(self) -> None:
            self.pending: dict[int, dict] = {}
            self.events: list[tuple[str, dict]] = []  # the job's event log entries of the next flush (jobs.events)
            self.latest: dict[str, Any] = {"num_parameters": int(trainer.num_parameters)}
            self.last_flush = time.monotonic()
            self.stop = False  # cancel requested, a limit reached or claim lost: the trainer stops before its next step
            self.lost = False  # another claim superseded ours: write nothing more
            self.interrupted = False  # this worker is shutting down

        def on_step(self, record: dict) -> None:
            row = _jsonable(dict(record))
            self.pending.setdefault(int(row["step"]), {}).update(row)
            self.events.append(("metric", row))
            self.latest.update({k: v for k, v in row.items() if k != "wall_seconds"})
            if time.monotonic() - self.last_flush > FLUSH_SECONDS or len(self.pending) >= FLUSH_ROWS:
                self.flush()

        def on_eval(self, metrics: dict) -> None:
            row = _jsonable(dict(metrics))
            # Evaluation NFE is kept apart from the training step's NFE at the same step.
            row = {("eval_" + k if k.startswith("nfe") else k): v for k, v in row.items()}
            self.pending.setdefault(int(row["step"]), {}).update(row)
            self.events.append(("evaluation", row))
            self.latest.update({k: v for k, v in row.items() if k != "step"})
            self.flush()

        def on_checkpoint(self, name: str, data: bytes) -> None:
            self.flush()  # the history must reach the checkpoint's step before the checkpoint exists
            if not self.lost:  # a cancelled job keeps its last checkpoint; a superseded one writes nothing
                save_checkpoint(ctx.artifacts, job.id, name, data, keep=ctx.settings.checkpoint_keep)  # + retention
                self.events.append(("checkpoint", {"name": name, "step": int(trainer.step)}))
                self.flush()

        def should_stop(self) -> bool:
            if _shutdown.is_set():
                self.stop = self.interrupted = True
            if guard():  # cancel, time or memory limit, or the heartbeat found our claim superseded
                if guard.error() is not None:
                    # a limit fails the job at once: no new checkpoint (writing one needs more memory
                    # and time), the last periodic one stays
                    raise guard.error()
                self.stop = True
                self.lost = self.lost or guard.reason == "lost"
            return self.stop

        def flush(self) -> None:
            rows = [{**values, "step": step} for step, values in sorted(self.pending.items())]
            events, self.events = self.events, []
            self.pending.clear()
            self.last_flush = time.monotonic()
            ok = ctx.store.record(job, token, rows, step=int(trainer.step), total_steps=int(trainer.total_steps),
                                  latest=self.latest, events_=events)
            if not ok:
                self.stop = self.lost = True

    return JobCallbacks()


def _engine_spec(job: Job, ctx: WorkerContext, stack: ExitStack) -> dict:
    spec = {k: dict(v) if isinstance(v, dict) else v for k, v in job.spec.items()}  # name, tags: not sections
    spec["dataset"].setdefault("path", None)
    if spec["dataset"]["name"] in UPLOAD_SUFFIXES:
        key = dataset_key(spec["dataset"]["id"], spec["dataset"]["name"])
        spec["dataset"]["path"] = str(stack.enter_context(ctx.artifacts.local_path(key)))
    return spec


def _finish(ctx: WorkerContext, job: Job, token: int, status: JobStatus, **values: Any) -> str:
    """Write the final ``status`` under our fencing token; ``"superseded"`` when the job is no longer ours."""
    return status if ctx.store.finish(job, token, status, **values) else "superseded"


def run_job(job_id: str, ctx: WorkerContext | None = None) -> str:
    """Train job ``job_id`` to its end.

    Returns the status written: succeeded, failed, cancelled, ``requeued`` (the worker is shutting
    down; the job is queued again and resumes from its checkpoint), ``deferred`` (its owner is at
    ``max_running_per_owner``: it stays queued; the task republishes it later), ``skipped`` (not claimable),
    ``superseded`` (another claim took the job over) or ``store-unavailable`` (the database went
    away; the job's lease runs out and the reconciler requeues it, see ``jobs/leases.py``).
    """
    ctx = ctx or worker_context()
    try:
        claimed = ctx.store.claim(job_id)
    except _STORE_ERRORS as exc:  # the job stays queued; the reconciler republishes it
        log.error("job %s: job store unreachable at claim (%s)", job_id, type(exc).__name__)
        return "store-unavailable"
    if claimed is None:
        if ctx.store.last_claim_reason == "owner-limit":
            log.info("job %s: its owner is at ODEFORGE_MAX_RUNNING_PER_OWNER; left queued", job_id)
            return "deferred"
        log.info("job %s: not claimable (%s); skipped", job_id, ctx.store.last_claim_reason)
        return "skipped"
    job, token = claimed
    log.info("job %s: claimed (attempt %d, token %d)", job_id, job.attempts, token)
    callbacks = lease = guard = None
    try:
        with ExitStack() as stack:
            # Heartbeat first: importing torch or loading a checkpoint may outlast a short lease.
            lease = stack.enter_context(LeaseKeeper(ctx.store.sessions, job.seq, token, ctx.store.lease))
            from node_engine.solve_limits import solve_limits
            from node_engine.training import Trainer, build_trainer

            spec = _engine_spec(job, ctx, stack)
            resume = latest_checkpoint(ctx.artifacts, job.id)
            if resume is not None:
                data = ctx.artifacts.get(checkpoint_key(job.id, resume))
                trainer = Trainer.from_checkpoint(data, device=ctx.device, dataset_path=spec["dataset"]["path"])
                ctx.store.truncate_metrics_after(job, token, int(trainer.step))
                log.info("job %s: resuming from %s at step %d", job_id, resume, trainer.step)
            else:
                trainer = build_trainer(spec, device=ctx.device)
                source = spec.get("init_from")
                if source:  # fine-tuning: parameters from another job's checkpoint (checked at submission)
                    trainer.load_parameters(ctx.artifacts.get(checkpoint_key(source["job"], source["checkpoint"])))
                    log.info("job %s: parameters from job %s, %s", job_id, source["job"], source["checkpoint"])
            guard = _make_guard(ctx, job, token, lease, float(trainer.elapsed_seconds))
            callbacks = _make_callbacks(ctx, job, token, trainer, guard)
            # every solve of training and evaluation: the NFE budget, the guard as its stop signal, and
            # compiled steps where the spec's solver.compile and the deployment allow them
            with solve_limits(max_nfe=ctx.settings.max_nfe_per_solve, stop=guard, compile=ctx.settings.solver_compile):
                final = trainer.run(callbacks)
        callbacks.flush()
        # The final summary adds what the step records lacked; its "status" is the trainer's own word.
        final = _jsonable(dict(final or {}))
        stopped_early = final.pop("status", None) == "cancelled" or int(trainer.step) < int(trainer.total_steps)
        latest = {**final, **callbacks.latest}
        if callbacks.lost:
            status = "superseded"
        elif stopped_early and ctx.store.should_stop(job, token):  # cancel requested
            status = _finish(ctx, job, token, JobStatus.CANCELLED, latest=latest)
        elif stopped_early and callbacks.interrupted:
            status = "requeued" if ctx.store.release(job, token) else "superseded"
        else:
            status = _finish(ctx, job, token, JobStatus.SUCCEEDED, latest=latest)
    except _STORE_ERRORS as exc:
        if callbacks is not None and (callbacks.lost or (lease is not None and lease.lost.is_set())):
            # A frozen worker wakes to a superseded claim and a connection the server has closed:
            # the job is another worker's now, so this is a fence, not an outage.
            log.info("job %s: superseded", job_id)
            return "superseded"
        # The job store went away mid-job: nothing can be recorded now. The lease runs out and the
        # reconciler requeues the job, which resumes from its last checkpoint.
        log.error("job %s: job store unreachable (%s: %s); left to the reconciler", job_id, type(exc).__name__,
                  str(exc).splitlines()[0] if str(exc) else "")
        return "store-unavailable"
    except Exception as exc:  # solver, data, checkpoint or programming error: the job fails, the worker goes on
        from node_engine.errors import ODEForgeError, SolveCancelled

        if not isinstance(exc, (ODEForgeError, JobTimeLimitExceeded, MemoryLimitExceeded)):
            log.exception("job %s: unexpected error", job_id)
        latest = callbacks.latest if callbacks is not None else None
        if callbacks is not None:
            try:
                callbacks.flush()
            except Exception:
                log.exception("job %s: could not write the last metric rows", job_id)
        if isinstance(exc, SolveCancelled) and guard is not None and guard.reason is not None:
            # a solve stopped by the guard: the job ends as the guard's reason says (its last
            # periodic checkpoint stays; the step in progress is lost)
            if guard.reason == "lost":
                status = "superseded"
            elif guard.error() is not None:
                status = _fail(ctx, job, token, guard.error(), latest)
            else:
                status = _finish(ctx, job, token, JobStatus.CANCELLED, latest=latest)
        else:
            status = _fail(ctx, job, token, exc, latest)
    finally:
        if guard is not None and guard.reason == "memory":
            trainer = callbacks = None  # noqa: F841 (drop the job's model and data before trimming the heap)
            _return_memory()
    log.info("job %s: %s", job_id, status)
    return status


def _make_guard(ctx: WorkerContext, job: Job, token: int, lease: LeaseKeeper, earlier_seconds: float) -> JobGuard:
    """The job's :class:`JobGuard`, made once its trainer is built: its time limit counts from now
    (the worker's first import of torch and the data loading are not the job's), less the training
    time of the attempts it resumed from (a requeued job does not start its clock again)."""
    limit = float(ctx.settings.max_job_seconds)
    return JobGuard(poll_s=ctx.settings.cancel_poll_s, seconds=limit - earlier_seconds, limit_seconds=limit,
                    memory_bytes=memory_limit_bytes(ctx.settings.max_worker_memory_mb),
                    should_cancel=lambda: ctx.store.should_stop(job, token), lost=lease.lost.is_set)


def _fail(ctx: WorkerContext, job: Job, token: int, exc: BaseException, latest: dict | None) -> str:
    return _finish(ctx, job, token, JobStatus.FAILED, latest=latest, error=(type(exc).__name__, str(exc)))


def _return_memory() -> None:
    """After a job stopped for memory: free its objects now and hand freed heap back to the OS, so
    the next job starts from a small process (glibc keeps freed memory otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
