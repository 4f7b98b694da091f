"""Micro-batching of concurrent log-density requests on one model.

A torch module answers one call at a time (each cached model has a lock), so under concurrent load
requests would queue on that lock and each pay the solver's fixed cost per step (Python control
flow, step-size control, small kernels) for its own few points. Here the requests waiting on a model
are coalesced: :meth:`LogDensityBatcher.submit` queues a request and returns a future at once; one
*drain* task per model (run on the inference pool's executor) takes the requests at the head of the
queue, up to ``max_points``, runs one solve and hands every request its rows; when more are waiting
it schedules itself again behind the pool's other work (so one busy model cannot hold every thread).
No timer: a request that finds the model idle runs at once, so batching adds no latency at low load.
No thread waits for another's batch: waiting happens in the event loop (``InferencePool.wait``).

Answers do not depend on the batch: ``DensityModel.log_density_rows`` integrates with per-sample
step control (each point's steps are chosen from its own error) and exact traces or Hutchinson noise
keyed by each point's own value. A point whose solve fails gets a per-row status (odeint's
``raise_on_failure=False``) and leaves the solve alone. Budgets keep that property:

- NFE: requests are only batched with requests of the same ``max_nfe``; with per-sample stepping a
  row takes part in every field evaluation of its solve until it is done, so it exceeds the solve's
  budget (status ``NFE_BUDGET``) exactly when its own evaluations would, whatever else is solved.
- Time and disconnects: the batch's ``stop`` trips only when *every* request in it has tripped its
  budget, so no request's answer is cut short by another's deadline or departure. A request that
  trips while queued is dropped from the queue before it costs a solve.

The reported ``nfe`` is that of the batch's solve. Anything that fails the batch as a whole (not a
per-row status) is retried request by request.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_MAX_POINTS = 4096  # node_engine.inference solves at most this many points at once


@dataclass
class _Request:
    points: np.ndarray
    budget: Any  # service.inference_pool.Budget or None (no limits)
    future: Future = field(default_factory=Future)

    @property
    def max_nfe(self) -> int | None:
        return None if self.budget is None else self.budget.max_nfe

    def tripped(self) -> bool:
        return self.budget is not None and self.budget.expired()


@dataclass
class _Queue:
    pending: deque = field(default_factory=deque)
    draining: bool = False


class LogDensityBatcher:
    """``submit(entry, points, budget)``: like ``entry.model.log_density_rows`` under ``entry.lock``, batched.

    Args:
        max_points: the most points one solve takes (a request larger than that is solved alone).
        executor: where drains run (the API's ``InferencePool.executor``); None: a private one-thread
            executor (tests, scripts).
    """

    def __init__(self, max_points: int = DEFAULT_MAX_POINTS, executor: Executor | None = None):
        self.max_points = max_points
        self._executor = executor
        self._lock = threading.Lock()
        self._queues: dict[int, _Queue] = {}  # id(entry) -> its waiting requests (removed when drained)
        self.batches = self.batched_requests = 0

    def _pool(self) -> Executor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="odeforge-batcher")
        return self._executor

    def submit(self, entry: Any, points: np.ndarray, budget: Any = None) -> Future:
        """Queue a request; its future gives ``(log_p (N,) nats, NaN where failed; status (N,) int64
        SolveStatus; nfe of the batch's solve)`` or raises what the model raises (``SolveCancelled``
        when its budget tripped before or during its solve)."""
        request = _Request(np.asarray(points, dtype=np.float64), budget)
        if budget is not None:
            budget.track(request.future)
        with self._lock:
            queue = self._queues.setdefault(id(entry), _Queue())
            queue.pending.append(request)
            start = not queue.draining
            queue.draining = True
        if start:
            self._pool().submit(self._drain, entry, queue)
        return request.future

    def log_density(self, entry: Any, points: np.ndarray, budget: Any = None) -> tuple[np.ndarray, int]:
        """Blocking: (N,) log-densities in nats and the batch's NFE; a failed row raises its named
        SolverError (``point i: ...``), as ``DensityModel.log_density`` does."""
        from node_engine.inference import raise_for_rows

        log_p, status, nfe = self.submit(entry, points, budget).result()
        raise_for_rows(status, "point")
        return log_p, nfe

    def _take(self, queue: _Queue) -> list[_Request]:
        """The next batch: head requests of one ``max_nfe`` up to ``max_points`` (tripped ones dropped)."""
        from node_engine.errors import SolveCancelled

        batch: list[_Request] = []
        size = 0
        with self._lock:
            while queue.pending:
                head = queue.pending[0]
                if head.tripped():
                    queue.pending.popleft()
                    head.future.set_exception(SolveCancelled(f"not started: {head.budget.reason}"))
                    continue
                if batch and (size + len(head.points) > self.max_points or head.max_nfe != batch[0].max_nfe):
                    break
                batch.append(queue.pending.popleft())
                size += len(head.points)
        return batch

    def _drain(self, entry: Any, queue: _Queue) -> None:
        batch = self._take(queue)
        try:
            if batch:
                self._run(entry, batch)
        finally:
            for r in batch:
                if not r.future.done():  # an unexpected failure in the split: never leave a request hanging
                    r.future.set_exception(RuntimeError("log-density batch failed"))
            with self._lock:
                if batch:
                    self.batches += 1
                    self.batched_requests += len(batch)
                again = bool(queue.pending)
                if not again:
                    queue.draining = False
                    self._queues.pop(id(entry), None)
            if again:  # behind the pool's other work: fair to other models and operations
                self._pool().submit(self._drain, entry, queue)

    @staticmethod
    def _solve(entry: Any, points: np.ndarray, requests: list[_Request]):
        from node_engine.solve_limits import solve_limits

        def stop() -> bool:  # only when every request of the solve has given up
            return all(r.tripped() for r in requests)

        limited = any(r.budget is not None for r in requests)
        with entry.lock, solve_limits(max_nfe=requests[0].max_nfe, stop=stop if limited else None):
            return entry.model.log_density_rows(points)

    def _run(self, entry: Any, batch: list[_Request]) -> None:
        try:
            logp, status, nfe = self._solve(entry, np.concatenate([r.points for r in batch]), batch)
        except Exception as exc:
            # Not a per-row failure: SolveCancelled (every request tripped) or something about the batch.
            from node_engine.errors import SolveCancelled

            if len(batch) == 1 or isinstance(exc, SolveCancelled):
                for r in batch:
                    r.future.set_exception(exc)
                return
            for r in batch:  # find whose points the model refuses: each request alone
                try:
                    r.future.set_result(self._solve(entry, r.points, [r]))
                except Exception as one:  # noqa: BLE001 - handed to the request's own future
                    r.future.set_exception(one)
            return
        start = 0
        for r in batch:
            rows = slice(start, start + len(r.points))
            r.future.set_result((logp[rows], status[rows], int(nfe)))
            start += len(r.points)
