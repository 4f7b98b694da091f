"""Inference off the event loop, bounded: a fixed pool of worker threads, an admission limit, and a
per-request budget (deadline, NFE per solve, client still connected).

Why: inference routes used to be sync routes, which FastAPI runs in the threadpool it shares with
every sync route and dependency (job status, submit, ``/readyz``, ``/metrics``). 45 slow one-point
log-density requests held all 40 of its threads, so job status waited minutes, and solves went on
after their clients had left. Now:

- Inference work runs in its own ``ThreadPoolExecutor`` of ``ODEFORGE_INFERENCE_WORKERS`` threads;
  the shared threadpool only ever runs short work, so other routes keep answering.
- At most ``workers + ODEFORGE_INFERENCE_QUEUE`` requests are admitted at once (queued or running,
  also while abandoned work still winds down); the next one is refused at once with a 503
  ``inference-busy`` problem and ``Retry-After`` instead of piling up.
- Each admitted request has a :class:`Budget`: a deadline (``ODEFORGE_INFERENCE_TIMEOUT_S``) and an
  NFE budget per solve (``ODEFORGE_INFERENCE_MAX_NFE``). They reach every ODE solve the request
  makes through ``node_engine.solve_limits`` (options ``max_nfe`` and ``stop``); ``stop`` trips on
  the deadline or when the client disconnects (an ASGI ``http.disconnect`` awaited while the route
  awaits its work), so work ends soon after its client leaves.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from starlette.requests import Request

from service.errors import ProblemError

T = TypeVar("T")

POLL_S = 0.1  # how often a waiting route checks its deadline and whether its client is still there


class Budget:
    """One request's limits, shared by the threads doing its work.

    Attributes:
        deadline: ``time.monotonic()`` value after which the request's solves stop.
        max_nfe: field evaluations allowed per solve (the ``max_nfe`` odeint option).
        reason: why the budget tripped (``"deadline"``, ``"client disconnected"``), None while live.
    """

    def __init__(self, timeout_s: float, max_nfe: int | None, release: Callable[[], None] = lambda: None):
        self.timeout_s = float(timeout_s)
        self.deadline = time.monotonic() + self.timeout_s
        self.max_nfe = max_nfe
        self.reason: str | None = None
        self._release = release
        self._lock = threading.Lock()
        self._pending: set[Future] = set()
        self._closed = self._released = False

    def cancel(self, reason: str) -> None:
        """Trip the budget: every solve of this request stops at its next step (``SolveCancelled``)."""
        if self.reason is None:
            self.reason = reason

    def expired(self) -> bool:
        """True once the deadline passed or the request was cancelled (the solver's ``stop`` callable:
        one clock read per step)."""
        if self.reason is None and time.monotonic() > self.deadline:
            self.reason = "deadline"
        return self.reason is not None

    def track(self, future: Future) -> Future:
        """Hold the request's admission slot until ``future`` is done (abandoned work still counts)."""
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)
        self._maybe_release()

    def close(self) -> None:
        """The route is done with the request; its slot is released once its work has ended too."""
        self._closed = True
        self._maybe_release()

    def _maybe_release(self) -> None:
        with self._lock:
            if not self._closed or self._pending or self._released:
                return
            self._released = True
        self._release()


class InferencePool:
    """``workers`` threads for inference work, at most ``workers + queue`` requests admitted at once."""

    def __init__(self, workers: int, queue: int, *, timeout_s: float, max_nfe: int | None):
        self.workers, self.queue, self.timeout_s, self.max_nfe = int(workers), int(queue), float(timeout_s), max_nfe
        self.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="odeforge-inference")
        self._lock = threading.Lock()
        self._live: set[Budget] = set()  # admitted, not yet released (tripped all at once on shutdown)
        self.in_flight = 0
        self.refused = 0

    @property
    def capacity(self) -> int:
        return self.workers + self.queue

    def admit(self) -> Budget:
        """A budget for a new request, holding one admission slot until ``Budget.close`` and its work end.

        Raises:
            ProblemError: 503 ``inference-busy`` with ``Retry-After`` when ``capacity`` requests are in flight.
        """
        with self._lock:
            if self.in_flight >= self.capacity:
                self.refused += 1
                busy = True
            else:
                self.in_flight += 1
                busy = False
                budget = Budget(self.timeout_s, self.max_nfe)
                budget._release = lambda: self._release(budget)
                self._live.add(budget)
        if busy:
            retry = max(1, math.ceil(self.timeout_s / 4))
            raise ProblemError(503, "inference-busy",
                               f"{self.capacity} inference requests are already queued or running "
                               f"(ODEFORGE_INFERENCE_WORKERS={self.workers} + ODEFORGE_INFERENCE_QUEUE={self.queue}); "
                               f"retry later", errors=[{"field": "body", "reason": "inference capacity reached"}],
                               headers={"Retry-After": str(retry)})
        return budget

    def _release(self, budget: Budget) -> None:
        with self._lock:
            self.in_flight -= 1
            self._live.discard(budget)

    def submit(self, budget: Budget, fn: Callable[[], T]) -> Future:
        """Run ``fn()`` on a pool thread with the budget's solve limits (``max_nfe``, ``stop``)."""
        from node_engine.solve_limits import solve_limits

        def run() -> T:
            if budget.expired():  # its client left, or its deadline passed, while it waited for a thread
                from node_engine.errors import SolveCancelled

                raise SolveCancelled(f"not started: {budget.reason}")
            with solve_limits(max_nfe=budget.max_nfe, stop=budget.expired):
                return fn()

        return budget.track(self.executor.submit(run))

    async def call(self, request: Request, budget: Budget, fn: Callable[[], T]) -> T:
        """``fn()`` on a pool thread under the budget; see :meth:`wait`."""
        return await self.wait(request, budget, self.submit(budget, fn))

    async def wait(self, request: Request, budget: Budget, future: Future) -> Any:
        """The result of ``future`` (raising what it raised), awaited without blocking the event loop.

        While waiting, a disconnect of the client trips the budget (the work stops at its next solver
        step) and the deadline is checked every ``POLL_S``: a tripped budget answers at once with a 503
        ``inference-timeout`` problem, even when the work is shared with other requests (a
        micro-batch) that keep it going.
        """
        waiting = asyncio.wrap_future(future)
        watcher = asyncio.ensure_future(_watch_disconnect(request, budget))
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=POLL_S)
                if done:
                    return waiting.result()
                if budget.expired():
                    waiting.add_done_callback(_consume)  # the work's own outcome is no longer anyone's
                    raise timeout_problem(budget)
        except asyncio.CancelledError:  # the server cancels the request (shutdown): stop its solves too
            budget.cancel("request cancelled")
            waiting.add_done_callback(_consume)
            raise
        finally:
            watcher.cancel()

    def close(self) -> None:
        """Shutdown: trip every live budget (running solves end at their next step), drop queued work."""
        with self._lock:
            live = list(self._live)
        for budget in live:
            budget.cancel("server shutting down")
        self.executor.shutdown(wait=False, cancel_futures=True)


async def _watch_disconnect(request: Request, budget: Budget) -> None:
    """Trip ``budget`` when the client disconnects. The body has been read, so the next ASGI message
    is ``http.disconnect``; this waits for it. (``request.is_disconnected()`` polls with an already
    cancelled scope, which behind Starlette's ``BaseHTTPMiddleware`` -- the metrics middleware --
    swallows the message and never reports the disconnect.)"""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            budget.cancel("client disconnected")
            return
        await asyncio.sleep(POLL_S)  # not expected after the body: do not spin


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def timeout_problem(budget: Budget) -> ProblemError:
    """503 ``inference-timeout`` naming ``ODEFORGE_INFERENCE_TIMEOUT_S`` (also sent, to no one, after a disconnect)."""
    if budget.reason not in (None, "deadline"):  # the client left, the server is shutting down
        detail = f"stopped: {budget.reason}; the request's solves were stopped"
    else:
        detail = f"the request ran past its budget of {budget.timeout_s:g} s (ODEFORGE_INFERENCE_TIMEOUT_S)"
    return ProblemError(503, "inference-timeout", detail,
                        errors=[{"field": "body", "reason": f"time budget of {budget.timeout_s:g} s exceeded"}],
                        headers={"Retry-After": str(max(1, math.ceil(budget.timeout_s / 4)))})
