"""Micro-batching of concurrent log-density requests on one model.

A torch module answers one call at a time (each cached model has a lock), so under concurrent load
requests queue on that lock and each pays the solver's fixed cost per step (Python control flow,
step-size control, small kernels) for its own few points. Here the requests waiting on a model are
coalesced: one thread (the *leader*) concatenates the points of the requests at the head of the
queue, up to ``max_points``, runs one solve, and hands every request its slice; it then promotes the
next waiting request to lead the next batch and returns. No timer: a request that finds the model
idle runs at once, so batching adds no latency at low load.

Answers do not depend on the batch: ``DensityModel.log_density_rows`` integrates with per-sample
step control (each point's steps are chosen from its own error) and exact traces or Hutchinson noise
keyed by each point's own value. The reported ``nfe`` is that of the batch's solve. A point whose
solve fails gets a per-row status (odeint's ``raise_on_failure=False``) and leaves the solve alone;
only the request that sent it gets the named solver error, the rest of the batch is answered from
the same solve. (Anything else that fails the batch as a whole is retried request by request.)
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_MAX_POINTS = 4096  # node_engine.inference solves at most this many points at once


@dataclass
class _Request:
    points: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    promoted: bool = False  # woken to lead the next batch, not because it was answered
    answered: bool = False
    result: tuple[np.ndarray, int] | None = None
    error: BaseException | None = None


@dataclass
class _Queue:
    pending: deque = field(default_factory=deque)
    leading: bool = False


class LogDensityBatcher:
    """``log_density(entry, points)``: like ``entry.model.log_density`` under ``entry.lock``, batched."""

    def __init__(self, max_points: int = DEFAULT_MAX_POINTS):
        self.max_points = max_points
        self._lock = threading.Lock()
        self._queues: dict[int, _Queue] = {}  # id(entry) -> its waiting requests (removed when drained)
        self.batches = self.batched_requests = 0

    def log_density(self, entry: Any, points: np.ndarray) -> tuple[np.ndarray, int]:
        """(N,) log-densities in nats and the NFE of the solve that produced them; raises what the model raises."""
        request = _Request(np.asarray(points, dtype=np.float64))
        with self._lock:
            queue = self._queues.setdefault(id(entry), _Queue())
            queue.pending.append(request)
            lead = not queue.leading
            queue.leading = True
        if not lead:
            request.done.wait()
            if request.answered:
                return self._result(request)
        self._lead(entry, queue)  # our request is at the head of the queue
        return self._result(request)

    @staticmethod
    def _result(request: _Request) -> tuple[np.ndarray, int]:
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _lead(self, entry: Any, queue: _Queue) -> None:
        with self._lock:
            batch = [queue.pending.popleft()]
            size = len(batch[0].points)
            while queue.pending and size + len(queue.pending[0].points) <= self.max_points:
                size += len(queue.pending[0].points)
                batch.append(queue.pending.popleft())
        try:
            self._run(entry, batch)
        finally:
            for r in batch:
                if not r.answered:  # an unexpected failure in the split: never leave a request hanging
                    r.error = r.error or RuntimeError("log-density batch failed")
                    r.answered = True
                if r is not batch[0]:
                    r.done.set()
            with self._lock:
                self.batches += 1
                self.batched_requests += len(batch)
                if queue.pending:
                    nxt = queue.pending[0]
                    nxt.promoted = True
                    nxt.done.set()  # it leads the next batch; its own answer is in that batch
                else:
                    queue.leading = False
                    self._queues.pop(id(entry), None)

    @staticmethod
    def _run(entry: Any, batch: list[_Request]) -> None:
        from node_engine.inference import raise_for_rows

        try:
            with entry.lock:
                logp, status, nfe = entry.model.log_density_rows(np.concatenate([r.points for r in batch]))
        except Exception as exc:
            # Not a solver failure (those are per-row statuses): something about the batch as a whole.
            if len(batch) == 1:
                batch[0].error, batch[0].answered = exc, True
                return
            for r in batch:  # find whose points the model refuses: each request alone
                try:
                    with entry.lock:
                        r.result = entry.model.log_density(r.points)
                except Exception as one:  # noqa: BLE001 - handed to the request's own thread
                    r.error = one
                r.answered = True
            return
        start = 0
        for r in batch:
            rows = slice(start, start + len(r.points))
            try:  # a failed row fails only its own request, named by its index there
                raise_for_rows(status[rows], "point")
                r.result = (logp[rows], int(nfe))
            except Exception as one:  # noqa: BLE001 - handed to the request's own thread
                r.error = one
            r.answered = True
            start += len(r.points)
