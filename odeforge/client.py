"""``odeforge.Client``: the HTTP API (``/v1``) from Python, one method per verb.

A thin synchronous wrapper over ``httpx``: answers are the API's JSON (dicts and lists, as in the
OpenAPI schema at ``/openapi.json``); arrays may be given as nested lists or anything with
``tolist()`` (NumPy, PyTorch). Errors are exceptions (``odeforge.errors``): the API's problem
documents as :class:`ProblemError`, no connection as :class:`ServiceUnreachable`, no answer in time
as :class:`RequestTimeout`.

This package imports nothing of the service (no FastAPI, no PyTorch): it talks HTTP only.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Iterator
from urllib.parse import quote

import httpx

from odeforge import sse
from odeforge.errors import OdeforgeError, ProblemError, RequestTimeout, ServiceUnreachable
from odeforge.sse import Event

DEFAULT_URL = "http://127.0.0.1:8000"
# Job statuses after which nothing changes (the wire values of jobs.status.TERMINAL; a test checks
# they agree, this package does not import the service's code).
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})

_NPY_MAGIC, _ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"
_RETRY_STATUSES = frozenset({502, 503, 504})  # an event stream is reopened after these (up to max_retries)


class _Retry(Exception):
    """Internal: reopen the event stream."""


class Client:
    """A connection to an odeforge API.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8000`` (default: ``$ODEFORGE_URL``, else that one).
        api_key: sent as ``Authorization: Bearer <key>`` (default: ``$ODEFORGE_API_KEY``; none when
            unset or empty). Needed when the server sets ``ODEFORGE_API_KEYS``.
        timeout: seconds to wait for a connection and for each answer (training is not waited for:
            see :meth:`wait`).
        transport: an ``httpx`` transport (tests, proxies); default: plain HTTP.

    Use as a context manager (or call :meth:`close`) to release the connection pool.
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0, *,
                 transport: httpx.BaseTransport | None = None):
        self.url = (url or os.environ.get("ODEFORGE_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("ODEFORGE_API_KEY")
        headers = {"User-Agent": "odeforge-client"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers, transport=transport)

    def __repr__(self) -> str:
        return f"odeforge.Client({self.url!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # ---- plumbing -------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._transport_errors():
            resp = self._http.request(method, path, **kwargs)
        if resp.is_error:
            raise _problem(resp)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._request(method, path, **kwargs)
        try:
            return resp.json()
        except ValueError:  # another web server at this URL, say
            raise OdeforgeError(f"{method} {resp.url} answered {resp.status_code} with "
                                f"{resp.headers.get('content-type', 'no content type')}, not JSON: is {self.url} "
                                f"an odeforge API?") from None

    def _transport_errors(self) -> "_TransportErrors":
        return _TransportErrors(self.url, self.timeout)

    def _download(self, path: str, dest: str | os.PathLike | None) -> bytes | Path:
        """GET ``path``: its bytes, or (``dest`` given) streamed into ``dest`` (written whole or not at all)."""
        if dest is None:
            return self._request("GET", path).content
        dest = Path(dest)
        with self._transport_errors(), self._http.stream("GET", path) as resp:
            if resp.is_error:
                resp.read()
                raise _problem(resp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
            try:
                with os.fdopen(fd, "wb") as f:
                    for chunk in resp.iter_bytes():
                        f.write(chunk)
                os.replace(tmp, dest)  # a dropped download leaves no half file under the name
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return dest

    # ---- service --------------------------------------------------------------------------------
    def ready(self) -> dict[str, str]:
        """``GET /readyz``: ``{"database": "ok", "broker": "ok"}``.

        Raises:
            ProblemError: 503 naming what is unreachable. ServiceUnreachable: no API at ``url``.
        """
        return self._json("GET", "/readyz")

    # ---- jobs -----------------------------------------------------------------------------------
    def submit(self, spec: Any, *, name: str | None = None, tags: list[str] | None = None,
               init_from: str | Mapping[str, Any] | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        """``POST /v1/jobs``: queue a training job; returns the job (``id``, ``status`` "queued", the
        stored ``spec`` with every default filled in, ...).

        Args:
            spec: the job spec: a dict (``{"model": {...}, "dataset": {...}, "solver": ..., "training": ...}``),
                or an object with ``model_dump()`` (``service.schemas.JobCreate``) or ``to_json()``; a dict's
                sections may also be such objects (``node_engine.specs.SolverSection(...)``); a model
                section needs its ``type``: ``{"type": "cnf", **CNFSection(...).to_json()}``.
            name, tags: the run's name and tags (set in the spec; listed with the job, filtered by :meth:`list`).
            init_from: start from another job's checkpoint: its id (its newest checkpoint) or
                ``{"job": id, "checkpoint": "step-000100.safetensors"}``.
            idempotency_key: ``Idempotency-Key``: resending the same key and body returns the first job.

        Raises:
            ProblemError: 422 with one ``{"field", "reason"}`` per invalid field in ``.errors``; 503 when
                the broker is down (nothing was queued). ValueError: a model section without ``type``.
        """
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = spec_json(spec)
        if name is not None:
            body["name"] = name
        if tags is not None:
            body["tags"] = list(tags)
        if init_from is not None:
            body["init_from"] = {"job": init_from} if isinstance(init_from, str) else dict(init_from)
        return self._json("POST", "/v1/jobs", json=body, headers=headers)

    def get(self, job_id: str) -> dict[str, Any]:
        """``GET /v1/jobs/{id}``: status, progress (0..1), step, spec, latest metrics, error, times.

        Raises:
            ProblemError: 404 for an unknown id or another API key's job.
        """
        return self._json("GET", f"/v1/jobs/{_q(job_id)}")

    def list(self, *, status: str | None = None, tag: str | None = None, name: str | None = None,
             limit: int | None = None, page_size: int | None = None) -> Iterator[dict[str, Any]]:
        """``GET /v1/jobs``: the caller's jobs, newest first, following ``next_page_token`` page by page.

        Args:
            status: only jobs with this status ("queued", "running", ...).
            tag: only jobs carrying this tag (exact). name: only jobs whose name contains this text
                (case-insensitive).
            limit: stop after this many jobs (default: all of them).
            page_size: jobs per request (default: the server's, ``ODEFORGE_PAGE_LIMIT_DEFAULT``).

        Yields job dicts as :meth:`get` returns them. Raises ProblemError (422: a bad filter value).
        """
        params = {k: v for k, v in (("status", status), ("tag", tag), ("name", name)) if v is not None}
        return self._pages("/v1/jobs", "jobs", params, limit=limit, page_size=page_size)

    def _pages(self, path: str, key: str, params: dict[str, Any], *, limit: int | None,
               page_size: int | None) -> Iterator[dict[str, Any]]:
        """The items under ``key`` of every page of ``path`` (keyset pages: ``next_page_token``)."""
        if page_size is not None or limit is not None:
            params = {**params, "limit": min(page_size or 500, limit or 500)}  # 500: the server's default cap
        seen = 0
        token: str | None = None
        while True:
            page = self._json("GET", path, params={**params, **({"page_token": token} if token else {})})
            for item in page[key]:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield item
            token = page.get("next_page_token")
            if not token or (limit is not None and seen >= limit):
                return

    def cancel(self, job_id: str) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/cancel``: a queued job is cancelled at once; a running one stops between
        training steps (its status stays "running" until the worker has stopped). Returns the job.

        Raises:
            ProblemError: 409 when the job already finished; 404 unknown job.
        """
        return self._json("POST", f"/v1/jobs/{_q(job_id)}/cancel")

    def delete(self, job_id: str) -> None:
        """``DELETE /v1/jobs/{id}``: cancel the job if it is queued or running, then remove it, its metric
        rows, events, checkpoints and figures (a later :meth:`get` is a 404).

        Raises:
            ProblemError: 404 unknown job; 409 a queued or running job starts from its checkpoint (``init_from``).
        """
        self._request("DELETE", f"/v1/jobs/{_q(job_id)}")

    def wait(self, job_id: str, *, timeout: float | None = None, poll_s: float = 1.0,
             progress: bool = False) -> dict[str, Any]:
        """Poll ``GET /v1/jobs/{id}`` until the job is succeeded, failed or cancelled; returns that job
        (check its ``status``: a failed job is returned, not raised; its ``error`` says why).

        Args:
            timeout: seconds to wait at most (default: no limit).
            poll_s: seconds between polls.
            progress: show a ``rich`` progress bar (status, step, loss, NFE) on stderr.

        Raises:
            TimeoutError: the job did not end within ``timeout``. ProblemError / ServiceUnreachable as :meth:`get`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _ProgressBar(job_id) if progress else None
        try:
            while True:
                job = self.get(job_id)
                if bar is not None:
                    bar.update(job)
                if job["status"] in TERMINAL:
                    return job
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:g} s")
                time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))
        finally:
            if bar is not None:
                bar.close()

    def events(self, job_id: str, *, last_event_id: str | None = None, reconnect: bool = True,
               max_retries: int = 5) -> Iterator[Event]:
        """``GET /v1/jobs/{id}/events`` (Server-Sent Events): the job's status changes, metric rows,
        evaluations, checkpoints and result, as :class:`odeforge.Event` (``event``, ``data`` parsed from
        JSON, ``id``), in order, until the job has ended.

        Event types: ``status`` ``{"status", ...}`` at each change (the stream ends after the final
        one), ``metric`` (a training step's row: ``step``, ``loss``, ``nfe_forward``, ...),
        ``evaluation`` (``step``, ``test_...``), ``checkpoint`` ``{"name", "step"}``, ``result``
        ``{"status", "metrics", "error"}``. A dropped connection is resumed with ``Last-Event-ID``
        (the server replays what came after it, so nothing is lost or repeated), after the server's
        ``retry:`` delay; ``max_retries`` consecutive failures raise. ``last_event_id`` starts after
        an event seen earlier. The iterator also ends when the job is deleted.

        Raises:
            ProblemError: 404 unknown job (or another key's). ServiceUnreachable: the stream could not be
            (re)opened ``max_retries`` times in a row.
        """
        state = sse.StreamState(last_event_id=last_event_id)
        failures, connected = 0, False
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if state.last_event_id is not None:
                headers["Last-Event-ID"] = state.last_event_id
            try:
                with self._http.stream("GET", f"/v1/jobs/{_q(job_id)}/events", headers=headers) as resp:
                    if resp.status_code in _RETRY_STATUSES and reconnect and failures < max_retries:
                        raise _Retry()  # a replica restarting behind the load balancer
                    if resp.is_error:
                        resp.read()
                        raise _problem(resp)
                    if resp.status_code == 204:  # SSE: the server says "do not reconnect"
                        return
                    connected = True
                    for event in sse.parse(resp.iter_lines(), state):
                        failures = 0  # progress: the retry budget is for failures in a row
                        yield event
                        if _ends_stream(event):
                            return
            except _Retry:
                failures += 1
                time.sleep((state.retry_ms or 1000) / 1000.0)
                continue
            except httpx.TransportError as exc:
                failures += 1
                if not reconnect or not connected or failures > max_retries:  # never reached: say so now
                    with self._transport_errors():
                        raise exc
                time.sleep((state.retry_ms or 1000) / 1000.0)
                continue
            # The server closed the stream cleanly without a final status (a proxy's idle cut, or the
            # job was deleted): done if the job has ended or is gone, else resume where it stopped.
            try:
                if self.get(job_id)["status"] in TERMINAL:
                    return
            except ProblemError as exc:
                if exc.status == 404:
                    return
                raise
            if not reconnect:
                return
            time.sleep((state.retry_ms or 1000) / 1000.0)

    def metrics(self, job_id: str, *, since_step: int | None = None) -> list[dict[str, Any]]:
        """``GET /v1/jobs/{id}/metrics`` (all pages): rows ``{"step", "loss", "nfe_forward",
        "nfe_backward", "wall_seconds", ...}`` in step order, only steps after ``since_step`` if given;
        evaluation steps also carry ``test_nll`` (nats) / ``test_bits_per_dim`` or ``test_accuracy``.

        Raises ProblemError (404 unknown job).
        """
        rows: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 10_000}
        if since_step is not None:
            params["since_step"] = since_step
        while True:
            page = self._json("GET", f"/v1/jobs/{_q(job_id)}/metrics", params=params)
            rows.extend(page["history"])
            if not page.get("next_page_token"):
                return rows
            params = {"limit": 10_000, "page_token": page["next_page_token"]}

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """``GET /v1/jobs/{id}/checkpoints``: ``[{"name": "step-000100.safetensors", "size_bytes", "url"},
        ..., {"name": "final.safetensors", ...}]``. Raises ProblemError (404 unknown job)."""
        return self._json("GET", f"/v1/jobs/{_q(job_id)}/checkpoints")["checkpoints"]

    def download_checkpoint(self, job_id: str, name: str | None = None,
                            path: str | os.PathLike | None = None) -> bytes | Path:
        """``GET /v1/jobs/{id}/checkpoints/{name}``: a safetensors checkpoint (tensors + JSON metadata,
        no pickle; ``node_engine.load_model(path)`` serves it offline).

        Args:
            name: e.g. ``final.safetensors`` (default: ``final.safetensors`` if the job has it, else its
                newest ``step-*`` checkpoint).
            path: where to write it (a file name); default: return the bytes.

        Returns the bytes, or ``path`` as a ``Path`` once the whole file is written there.

        Raises:
            ProblemError: 404 unknown job or checkpoint. OdeforgeError: ``name`` omitted and the job has
            no checkpoint yet.
        """
        name = name or self.newest_checkpoint(job_id)
        return self._download(f"/v1/jobs/{_q(job_id)}/checkpoints/{_q(name)}", path)

    def newest_checkpoint(self, job_id: str) -> str:
        """The name of a job's ``final.safetensors`` if it has one, else of its newest ``step-*`` checkpoint.

        Raises:
            OdeforgeError: the job has no checkpoint yet. ProblemError: 404 unknown job.
        """
        names = sorted(c["name"] for c in self.checkpoints(job_id))
        if not names:
            raise OdeforgeError(f"job {job_id} has no checkpoint yet")
        return "final.safetensors" if "final.safetensors" in names else names[-1]  # step-NNNNNN sort by step

    def plot(self, job_id: str, name: str = "training", path: str | os.PathLike | None = None) -> bytes | Path:
        """``GET /v1/jobs/{id}/plots/{name}.png``: a PNG figure: ``training`` (loss, test metric and NFE
        against step) for every job; ``density``, ``samples`` for 2-D density jobs; ``trajectories`` for
        time-series jobs. Returns the bytes, or ``path`` once written there.

        Raises:
            ProblemError: 404 unknown plot or job; 409 the job's model does not draw it or has no checkpoint.
        """
        return self._download(f"/v1/jobs/{_q(job_id)}/plots/{_q(name)}.png", path)

    # ---- inference ------------------------------------------------------------------------------
    def log_density(self, job_id: str, points: Any) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/log-density``: log p(x) in nats at ``points`` (N, D) in the data's
        coordinates, from the job's newest checkpoint. Returns ``{"log_density": (N,) (null = -inf),
        "nfe": int, "checkpoint": name}``.

        Raises:
            ProblemError: 409 not a density job or no checkpoint yet; 422 wrong dimension (field
            ``points[i]``), non-finite values, more than ``ODEFORGE_MAX_POINTS`` points.
        """
        return self._json("POST", f"/v1/jobs/{_q(job_id)}/log-density", json={"points": _plain(points)})

    def samples(self, job_id: str, n: int = 1000, seed: int = 0) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/samples``: ``{"samples": (n, D) in the data's coordinates, "checkpoint"}``,
        the same for the same ``seed``. Raises ProblemError (409 not a density/energy job or no
        checkpoint; 422 ``n`` beyond ``ODEFORGE_MAX_SAMPLES``)."""
        return self._json("POST", f"/v1/jobs/{_q(job_id)}/samples", json={"n": int(n), "seed": int(seed)})

    def predict(self, job_id: str, inputs: Any) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/predict``: class probabilities ``{"probabilities": (N, 10), "checkpoint"}``
        for images ``inputs`` (N, C, H, W) or (N, H, W) in the training data's raw pixel scale (0..16
        for ``digits``, 0..255 for ``mnist``). Raises ProblemError (409 not a classifier job or no
        checkpoint; 422 wrong shape or non-finite values, field ``inputs``)."""
        return self._json("POST", f"/v1/jobs/{_q(job_id)}/predict", json={"inputs": _plain(inputs)})

    def forecast(self, job_id: str, series: Any, t: Any, *, samples: int | None = None) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/forecast``: each series' trajectory at times ``t`` (T,), in the data's units.

        Args:
            series: ``[{"t": (T_i,), "y": (T_i, D) (None = missing), "mask": optional (T_i, D) bools}, ...]``.
            t: the times to answer at, increasing, not before any series' first time.
            samples: posterior draws per series (latent models only).

        Returns ``{"forecasts": [{"t", "mean": (T, D)}, ...], "nfe", "checkpoint"}``.

        Raises:
            ProblemError: 409 not a time-series job or no checkpoint; 422 naming the field
            (``series[i].t[j]`` out of order, ``series[i].y[j]`` wrong dimension, ``t`` too early, ...).
        """
        body: dict[str, Any] = {"series": [{k: _plain(v) for k, v in dict(s).items()} for s in series],
                                "t": _plain(t)}
        if samples is not None:
            body["samples"] = int(samples)
        return self._json("POST", f"/v1/jobs/{_q(job_id)}/forecast", json=body)

    # ---- data sets ------------------------------------------------------------------------------
    def upload(self, data: str | os.PathLike | bytes | IO[bytes], *, filename: str | None = None,
               kind: str = "array") -> dict[str, Any]:
        """``POST /v1/datasets``: upload a data set; returns ``{"id", "shape"}`` (use it as
        ``{"dataset": {"name": "upload" (or "series_upload"), "id": ...}}``).

        Args:
            data: a file path, the file's bytes, or a binary file object. ``kind="array"``: an (N, D)
                ``.npy`` (no pickles) or CSV; ``kind="series"``: a long CSV ``series_id, t, y1, ..., yD``
                or an ``.npz`` with ``t`` (N, T), ``y`` (N, T, D), optional ``mask``.
            filename: the name sent (its suffix tells the format); default: the path's name, or for bytes
                ``data.npy`` / ``data.npz`` / ``data.csv`` from the content's first bytes.
            kind: "array" or "series".

        Raises:
            ProblemError: 422 ``invalid-dataset`` with the reason (field ``file``); 413 too large.
        """
        if isinstance(data, (str, os.PathLike)):
            path = Path(data)
            with path.open("rb") as f:
                return self._upload(f, filename or path.name, kind)
        if isinstance(data, (bytes, bytearray, memoryview)):
            content = bytes(data)
            return self._upload(content, filename or _sniff_name(content), kind)
        return self._upload(data, filename or Path(getattr(data, "name", "") or "data.csv").name, kind)

    def _upload(self, content: Any, filename: str, kind: str) -> dict[str, Any]:
        return self._json("POST", "/v1/datasets", params={"kind": kind},
                          files={"file": (filename, content, "application/octet-stream")})

    def datasets(self, *, limit: int | None = None, page_size: int | None = None) -> Iterator[dict[str, Any]]:
        """``GET /v1/datasets``: the caller's uploads, newest first, following ``next_page_token``:
        ``{"id", "shape", "kind" ("array" | "series"), "filename", "created_at"}``; at most ``limit``.
        Raises ProblemError."""
        return self._pages("/v1/datasets", "datasets", {}, limit=limit, page_size=page_size)

    def delete_dataset(self, dataset_id: str) -> None:
        """``DELETE /v1/datasets/{id}``: remove an upload (row and file); finished jobs keep their checkpoints.

        Raises:
            ProblemError: 404 unknown id (or another key's); 409 a queued or running job trains on it.
        """
        self._request("DELETE", f"/v1/datasets/{_q(dataset_id)}")


def spec_json(spec: Any) -> dict[str, Any]:
    """The JSON body of a job spec given as a dict, a pydantic model or an object with ``to_json()``
    (whole, or per section); ValueError for a model section that does not say its ``type``."""
    if hasattr(spec, "model_dump"):
        return spec.model_dump(mode="json", exclude_none=True)
    if not isinstance(spec, Mapping) and hasattr(spec, "to_json"):
        spec = spec.to_json()
    if not isinstance(spec, Mapping):
        raise TypeError(f"a job spec is a dict or an object with model_dump()/to_json(), not {type(spec).__name__}")
    out: dict[str, Any] = {}
    for key, value in spec.items():
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json", exclude_none=True)
        elif hasattr(value, "to_json"):
            value = value.to_json()
            if key == "model" and "type" not in value:
                raise ValueError(f"the model section {type(spec[key]).__name__} does not name its type; pass "
                                 f"{{'type': '<model type>', **section.to_json()}}")
        out[key] = value
    return out


def _q(segment: str) -> str:
    """A path segment, percent-encoded: an id or name cannot reach another path (``../``, ``?``)."""
    return quote(str(segment), safe="")


def _plain(value: Any) -> Any:
    """Arrays (NumPy, PyTorch: anything with ``tolist``) as nested lists, for JSON."""
    return value.tolist() if hasattr(value, "tolist") else value


def _sniff_name(content: bytes) -> str:
    if content.startswith(_NPY_MAGIC):
        return "data.npy"
    if content.startswith(_ZIP_MAGIC):
        return "data.npz"
    return "data.csv"


def _problem(resp: httpx.Response) -> ProblemError:
    """The :class:`ProblemError` of an error answer (problem+json, or whatever a proxy sent)."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        text = " ".join(resp.text.split())[:300]
        body = {"status": resp.status_code, "title": resp.reason_phrase, "detail": text or resp.reason_phrase}
    return ProblemError(resp.status_code, body, method=resp.request.method, url=str(resp.request.url))


def _ends_stream(event: Event) -> bool:
    """The event that closes a job's stream: the final ``status`` (``result`` comes just before it)."""
    data = event.data
    return event.event == "status" and isinstance(data, dict) and data.get("status") in TERMINAL


class _TransportErrors:
    """Context manager turning ``httpx`` transport errors into the client's one-line exceptions."""

    def __init__(self, url: str, timeout: float | None):
        self.url, self.timeout = url, timeout

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or not isinstance(exc, httpx.TransportError):
            return
        if isinstance(exc, httpx.ConnectTimeout):
            raise ServiceUnreachable(self.url, "connection timed out") from exc
        if isinstance(exc, httpx.TimeoutException):
            raise RequestTimeout(self.url, self.timeout) from exc
        raise ServiceUnreachable(self.url, _reason(exc)) from exc


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "refused" in text.lower():
        return "connection refused"
    if text.startswith("[Errno"):  # "[Errno -2] Name or service not known" -> the words only
        text = text.split("]", 1)[-1].strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _ProgressBar:
    """A rich progress bar for :meth:`Client.wait`: status, step, loss, NFE forward/backward (stderr)."""

    def __init__(self, job_id: str):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn())
        self._progress = Progress(*columns, console=Console(stderr=True), transient=False)
        self._progress.start()
        self._task = self._progress.add_task(f"job {job_id[:8]}", total=1.0, info="queued")

    def update(self, job: dict[str, Any]) -> None:
        self._progress.update(self._task, completed=job.get("progress") or 0.0, info=progress_info(job))

    def close(self) -> None:
        self._progress.stop()


def progress_info(job: dict[str, Any]) -> str:
    """``running  step 40/200  loss 1.234  NFE 26/32``: a job's status line."""
    m = job.get("metrics") or {}
    info = str(job.get("status"))
    if isinstance(m.get("loss"), (int, float)):
        info += f"  step {job.get('step')}/{job.get('total_steps')}  loss {m['loss']:.3f}"
    if m.get("nfe_forward") is not None:
        info += f"  NFE {m.get('nfe_forward')}/{m.get('nfe_backward')}"
    return info
