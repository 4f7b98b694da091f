"""The service layer under the ``/v1/jobs`` and ``/v1/datasets`` routes.

Submit, read, list and cancel jobs, page their metrics, store uploaded data sets. Routes parse the
request and shape the answer; what a request *does* to the job store, the artifact store and the
broker is here, with the API's problems (``ProblemError``) for what a client got wrong. Built once
per app (:class:`service.container.Services`); it holds no per-request state and is thread-safe.
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
import uuid
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from jobs.artifacts import (
    ArtifactStore,
    checkpoint_key,
    checkpoint_prefix,
    dataset_key,
    latest_checkpoint,
    plots_prefix,
)
from jobs.queue import Broker, BrokerUnavailable
from jobs.status import JobStatus
from jobs.store import IdempotencyConflict, JobStore
from jobs.tables import Dataset, Job
from service import pagination
from service.auth import Caller
from service.errors import ProblemError
from service.observability import ApiMetrics
from service.storage import StorageGuard

BROKER_RETRY_AFTER_S = 5
UPLOAD_SUFFIXES = (".npy", ".csv", ".txt")
SERIES_SUFFIXES = (".npz", ".csv", ".txt")
#: upload data-set name -> the rank of its stored shape ((N, D) arrays, (N, T, D) series)
UPLOAD_KINDS = {"upload": 2, "series_upload": 3}


class JobService:
    """Jobs of the API: the job store for state, the broker for work, the artifact store for uploads."""

    def __init__(self, store: JobStore, broker: Broker, artifacts: ArtifactStore, metrics: ApiMetrics, *,
                 max_upload_bytes: int, storage: StorageGuard | None = None, max_job_cost: float = float("inf")):
        self.store, self.broker, self.artifacts, self.metrics = store, broker, artifacts, metrics
        self.max_upload_bytes = max_upload_bytes
        self.storage = storage  # disk space and owner quota (507); None: unchecked
        self.max_job_cost = max_job_cost

    def submit(self, spec: dict[str, Any], caller: Caller, idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Store a queued job for ``spec`` (a validated ``JobCreate`` dumped to JSON), then publish it.

        Returns ``(job, created)``; ``created`` is False when ``idempotency_key`` replays an earlier
        submission of the same spec. The message is published only after the row is committed, and
        a job the broker refused is deleted again, so a 503 leaves nothing behind.
        Raises ProblemError: 422 ``invalid-request`` (an uploaded data set the caller cannot see; a
        ``solver.rtol``/``solver.eval_rtol`` below what its dtype can honour), 422 ``job-too-costly``
        (the estimated cost is above ``ODEFORGE_MAX_JOB_COST``), 422 ``idempotency-key-reused`` (the
        key with another spec), 503 ``broker-unavailable``, 507 ``insufficient-storage`` /
        ``quota-exceeded`` (:class:`service.storage.StorageGuard`).
        """
        dataset = spec["dataset"]
        upload = None
        if dataset["name"] in UPLOAD_KINDS:
            upload = self._visible_dataset(dataset.get("id"), caller, UPLOAD_KINDS[dataset["name"]])
            if upload is None:
                raise ProblemError(422, "invalid-request", f"no uploaded {dataset['name']!r} data set with id "
                                   f"{dataset.get('id')!r}",
                                   errors=[{"field": "dataset.id", "reason": f"unknown uploaded data set for "
                                                                              f"{dataset['name']!r}"}])
        if spec.get("init_from"):
            self._resolve_init_from(spec, caller)  # names the checkpoint: the spec is then complete
        self._check_bounds(spec, upload.shape if upload is not None else None)
        if self.storage is not None:
            self.storage.admit(caller.owner)  # 507: artifact disk below its reserve, or owner over quota
        try:
            job, created = self.store.create_job(spec, idempotency_key=caller.idempotency_key(idempotency_key),
                                                 owner=caller.owner)
        except IdempotencyConflict as exc:
            raise ProblemError(422, "idempotency-key-reused",
                               f"Idempotency-Key was used for job {exc} with a different body",
                               errors=[{"field": "Idempotency-Key", "reason": "reused with a different request body"}])
        if created:
            try:
                self.broker.enqueue_training(job.id)
            except BrokerUnavailable as exc:
                self.store.delete_job(job.id)  # a rejected submission leaves nothing behind
                self.metrics.broker_errors.inc()
                raise ProblemError(503, "broker-unavailable", f"the job queue is unavailable, retry later ({exc})",
                                   headers={"Retry-After": str(BROKER_RETRY_AFTER_S)})
            self.metrics.jobs_submitted.inc()
        return job, created

    def _visible_dataset(self, dataset_id: str, caller: Caller, ndim: int) -> Dataset | None:
        ds = self.store.get_dataset(dataset_id)  # the stored shape tells arrays (N, D) from series (N, T, D)
        return ds if ds is not None and caller.may_see(ds.owner) and len(ds.shape or ()) == ndim else None

    def _check_bounds(self, spec: dict[str, Any], upload_shape: list[int] | None) -> None:
        """Refuse (422) tolerances the job's dtype cannot honour and a spec whose estimated cost
        (:func:`node_engine.cost.estimate_cost`) is above ``max_job_cost``."""
        from node_engine.cost import estimate_cost, input_info, tolerance_errors
        from node_engine.specs import normalize_spec

        errors = tolerance_errors(spec["solver"])
        if errors:
            raise ProblemError(422, "invalid-request", "; ".join(f"{e['field']}: {e['reason']}" for e in errors),
                               errors=errors)
        try:
            normalized = normalize_spec(spec)
            cost = estimate_cost(normalized, input_info(normalized["dataset"], upload_shape))
        except (ValueError, TypeError, RuntimeError) as exc:  # the trainer could not build it either
            raise ProblemError(422, "invalid-request", f"model: {exc}",
                               errors=[{"field": "model", "reason": str(exc)}]) from None
        if cost.total > self.max_job_cost:
            reason = (f"estimated cost {cost.total:.3g} exceeds the limit ODEFORGE_MAX_JOB_COST={self.max_job_cost:.3g} "
                      f"(parameters {cost.parameters} x state size {cost.state_size} x per-sample field evaluations "
                      f"{cost.train_evaluations:.3g} in training + {cost.eval_evaluations:.3g} in evaluation); fewer "
                      f"iterations, a smaller batch_size, model or test set, or looser tolerances cost less")
            raise ProblemError(422, "job-too-costly", reason, errors=[{"field": "spec", "reason": reason}])

    def get(self, job_id: str, caller: Caller) -> Job:
        """The job ``job_id``; 404 problem when unknown or another API key's (existence is not revealed)."""
        job = self.store.get_job(job_id)
        if job is None or not caller.may_see(job.owner):
            raise ProblemError(404, "job-not-found", f"no job with id {job_id!r}")
        return job

    def list(self, caller: Caller, *, status: JobStatus | None, limit: int,
             page_token: str | None, tag: str | None = None, name: str | None = None) -> tuple[list[Job], str | None]:
        """The caller's jobs, newest first, ``limit`` per page; the second value is the next page's token.
        ``tag``: only jobs with that tag; ``name``: only jobs whose name contains it (case-insensitive).

        Raises ProblemError 422 for a ``page_token`` this endpoint did not return.
        """
        jobs, next_seq = self.store.list_jobs(status=status, limit=limit,
                                              before_seq=pagination.decode("jobs", page_token), owner=caller.owner,
                                              tag=tag, name=name)
        return jobs, (pagination.encode("jobs", next_seq) if next_seq is not None else None)

    def cancel(self, job: Job) -> Job:
        """Cancel ``job``: a queued one at once, a running one within about ``cancel_poll_s`` (its worker
        checks between training steps and inside every solve; it stays
        ``running`` until its worker stops). 409 problem when it already succeeded or failed."""
        result = self.store.request_cancel(job.id)
        if result.job is None:
            raise ProblemError(404, "job-not-found", f"no job with id {job.id!r}")
        if result.conflict:
            raise ProblemError(409, "job-finished", f"job {job.id} already {result.job.status}; nothing to cancel")
        return result.job

    def history(self, job: Job, *, since_step: int | None, limit: int,
                page_token: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """Metric rows of ``job`` after ``since_step`` (or after the page token's step), in step order,
        ``limit`` per page; the second value is the next page's token. 422 problem for a foreign token."""
        after = pagination.decode("metrics", page_token)
        if after is None:
            after = since_step if since_step is not None else -1
        rows, more = self.store.metrics_history(job, after_step=after, limit=limit)
        return rows, (pagination.encode("metrics", more) if more is not None else None)

    def upload_dataset(self, filename: str | None, stream: BinaryIO, caller: Caller, kind: str = "array",
                       dtype: str | None = None) -> tuple[Dataset, str]:
        """Validate and store an upload: ``kind="array"`` an (N, D) array (``.npy`` without pickles, or
        CSV) for ``{"name": "upload"}``; ``kind="series"`` time series (long CSV ``series_id, t, y1..yD``
        or ``.npz`` t/y/mask) for ``{"name": "series_upload"}``, stored as ``.npz`` with shape (N, T, D).

        Precision (``dtype``: None or ``float16``/``float32``/``float64``): an array is stored in its
        own dtype, at most float32, unless ``dtype`` asks (``node_engine.datasets.tabular.storage_dtype``);
        series keep float64 times (strictly increasing times must stay so) and store their values as
        float32 unless ``dtype`` asks. Returns ``(dataset row, stored dtype name)``.

        Validation is node_engine's own (arrays: 2-D, numeric, finite, 10+ rows, no constant column;
        series: finite, strictly increasing times per series, sizes; the row/series at fault named):
        the worker applies the same when it trains. Raises ProblemError: 422 ``invalid-dataset``
        naming the reason (also a value the asked ``dtype`` cannot hold), 413 ``upload-too-large``
        past ``max_upload_bytes``, 507 ``insufficient-storage`` (disk) / ``quota-exceeded`` (owner).
        """
        from node_engine.datasets import timeseries
        from node_engine.datasets.tabular import load_array, storage_dtype, validate_array
        from node_engine.errors import DatasetError

        suffix = Path(filename or "").suffix.lower()
        allowed = SERIES_SUFFIXES if kind == "series" else UPLOAD_SUFFIXES
        if suffix not in allowed:
            raise _bad_upload(f"unsupported file type {suffix or '(none)'!r} for kind {kind!r}; upload "
                              f"{' or '.join(allowed[:2])}")
        data = stream.read(self.max_upload_bytes + 1)
        if len(data) > self.max_upload_bytes:
            raise ProblemError(413, "upload-too-large", f"upload exceeds {self.max_upload_bytes} bytes",
                               errors=[{"field": "file", "reason": f"larger than {self.max_upload_bytes} bytes"}])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(data)
            del data  # the bytes live in the file now; do not hold two copies of a 64 MB upload
            try:
                if kind == "series":
                    series = timeseries.load_series(path)
                else:
                    array = load_array(path, dtype=None)  # validated in its own dtype, not widened
            except DatasetError as exc:
                raise _bad_upload(str(exc)) from None
            except (EOFError, UnicodeDecodeError):  # an empty .npy, a binary "CSV"
                raise _bad_upload("empty, truncated or not UTF-8 text") from None
        dataset_id = uuid.uuid4().hex
        if kind == "series":
            stored_dtype = np.dtype(dtype or "float32")
            y = series.y.astype(stored_dtype)
            if not np.isfinite(y).all():
                raise _bad_dtype(stored_dtype.name, "a value of y does not fit")
            blob = timeseries.save_npz(dataclasses.replace(series, y=y))
            key, shape = dataset_key(dataset_id, "series_upload"), list(series.y.shape)
        else:
            stored_dtype = storage_dtype(array.dtype, dtype)
            if stored_dtype != array.dtype:
                try:  # a narrower float may overflow (inf) or merge a column's values (constant)
                    with np.errstate(over="ignore"):
                        narrowed = array.astype(stored_dtype)
                    array = validate_array(narrowed, dtype=None)
                except DatasetError as exc:
                    raise _bad_dtype(dtype or stored_dtype.name, str(exc)) from None
            buf = io.BytesIO()
            np.save(buf, array, allow_pickle=False)
            blob, key, shape = buf.getvalue(), dataset_key(dataset_id), list(array.shape)
        if self.storage is not None:
            self.storage.admit(caller.owner, len(blob))
        self.artifacts.put(key, blob)
        try:
            row = self.store.create_dataset(dataset_id, shape, (filename or "")[:255], owner=caller.owner)
        except BaseException:
            self.artifacts.delete(key)  # no row, no file (a full database disk must not leak artifacts)
            raise
        return row, stored_dtype.name

    def delete_checkpoint(self, job: Job, name: str) -> None:
        """Delete checkpoint ``name`` of a finished job (freeing quota). 409 ``job-active`` while the
        job is queued or running (it resumes from its newest checkpoint); 404 when there is none."""
        if not job.status.terminal:
            raise ProblemError(409, "job-active", f"job {job.id} is {job.status}; its checkpoints are deleted "
                               "only once it has ended")
        if not self.artifacts.exists(checkpoint_key(job.id, name)):
            raise ProblemError(404, "checkpoint-not-found", f"job {job.id} has no checkpoint {name!r}")
        self.artifacts.delete(checkpoint_key(job.id, name))


    # ---- lifecycle (issue 15): fine-tuning sources, deleting jobs and uploads ---------------------
    def _resolve_init_from(self, spec: dict[str, Any], caller: Caller) -> None:
        """Check ``spec["init_from"]`` and name the checkpoint it starts from (its newest when null).

        The source must be a job the caller can see, with the same ``model`` section (the same
        architecture) and the same data set name (uploads: the same shape past N), and the checkpoint
        must exist. Raises ProblemError 422 naming ``init_from.job``, ``init_from.checkpoint`` or ``init_from``.
        """
        init = spec["init_from"]
        source = self.store.get_job(init["job"])
        if source is None or not caller.may_see(source.owner):
            raise _bad_init("init_from.job", f"no job with id {init['job']!r}")
        if source.spec.get("model") != spec["model"]:
            differ = sorted(k for k in set(source.spec["model"]) | set(spec["model"])
                            if source.spec["model"].get(k) != spec["model"].get(k))
            raise _bad_init("init_from", f"the model section differs from job {source.id}'s "
                                         f"({', '.join(differ)}); the parameters would not fit")
        if not self._same_data_shape(source.spec["dataset"], spec["dataset"]):
            raise _bad_init("init_from", f"job {source.id} was trained on other data ({source.spec['dataset']['name']!r}"
                                         f" vs {spec['dataset']['name']!r}, or another upload shape)")
        name = init.get("checkpoint") or latest_checkpoint(self.artifacts, source.id)
        if name is None or not self.artifacts.exists(checkpoint_key(source.id, name)):
            raise _bad_init("init_from.checkpoint", f"job {source.id} has no checkpoint {name or '(none yet)'!r}")
        spec["init_from"] = {"job": source.id, "checkpoint": name}

    def _same_data_shape(self, a: dict[str, Any], b: dict[str, Any]) -> bool:
        if a["name"] != b["name"]:
            return False
        if a.get("id") is None or a.get("id") == b.get("id"):
            return True
        da, db = self.store.get_dataset(a["id"]), self.store.get_dataset(b["id"])
        return da is not None and db is not None and list(da.shape)[1:] == list(db.shape)[1:]

    def delete(self, job: Job) -> None:
        """Delete ``job``: cancel it if queued or running (its worker is fenced out and stops at its
        next write), remove its row with its metric rows, events and tags, then its artifacts
        (checkpoints, cached plots). Raises ProblemError 409 ``job-in-use`` while a queued or running
        job starts from one of its checkpoints (``init_from``)."""
        users = self.store.jobs_using(init_job_id=job.id)
        if users:
            raise ProblemError(409, "job-in-use", f"job {job.id} is the init_from source of queued or running "
                               f"job(s) {', '.join(users)}; cancel or delete them first")
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            self.store.request_cancel(job.id)
        self.store.delete_job(job.id)
        for prefix in (checkpoint_prefix(job.id), plots_prefix(job.id)):
            for name, _ in self.artifacts.list(prefix):
                self.artifacts.delete(f"{prefix}/{name}")

    def list_datasets(self, caller: Caller, *, limit: int, page_token: str | None) -> tuple[list[Dataset], str | None]:
        """The caller's uploaded data sets, newest first, ``limit`` per page, and the next page's token.
        Raises ProblemError 422 for a ``page_token`` this endpoint did not return."""
        rows, after = self.store.list_datasets(owner=caller.owner, limit=limit,
                                               before=pagination.decode_key("datasets", page_token))
        return rows, (pagination.encode_key("datasets", *after) if after is not None else None)

    def get_dataset(self, dataset_id: str, caller: Caller) -> Dataset:
        """Uploaded data set ``dataset_id``; 404 problem when unknown or another API key's."""
        ds = self.store.get_dataset(dataset_id)
        if ds is None or not caller.may_see(ds.owner):
            raise ProblemError(404, "dataset-not-found", f"no uploaded data set with id {dataset_id!r}")
        return ds

    def delete_dataset(self, dataset: Dataset) -> None:
        """Delete an upload (row and file). Raises ProblemError 409 ``dataset-in-use`` while a queued or
        running job trains on it (finished jobs keep their checkpoints; their plots of the data need it)."""
        users = self.store.delete_dataset(dataset.id)  # checks for users in the deleting transaction
        if users:
            raise ProblemError(409, "dataset-in-use", f"data set {dataset.id} is used by queued or running job(s) "
                               f"{', '.join(users)}; cancel them or wait until they finish")
        kind = "series_upload" if len(dataset.shape or ()) == 3 else "upload"
        self.artifacts.delete(dataset_key(dataset.id, kind))


def _bad_dtype(dtype: str | None, reason: str) -> ProblemError:
    reason = f"cannot be stored as {dtype}: {reason}; upload with another dtype"
    return ProblemError(422, "invalid-dataset", reason, errors=[{"field": "dtype", "reason": reason}])


def _bad_init(field: str, reason: str) -> ProblemError:
    return ProblemError(422, "invalid-request", f"{field}: {reason}", errors=[{"field": field, "reason": reason}])


def _bad_upload(reason: str) -> ProblemError:
    return ProblemError(422, "invalid-dataset", reason, errors=[{"field": "file", "reason": reason}])
