"""Whether the job a worker runs must stop now: the one place a worker asks it.

:class:`JobGuard` answers for the training loop (between steps, ``TrainingCallbacks.should_stop``)
and for every ODE solve of the job (``options["stop"]``, polled once per solver step, see
:func:`node_engine.solve_limits.solve_limits`), so a cancel or a limit ends a job within about
``cancel_poll_s`` even inside one long solve (a 1e-13 tolerance evaluation). Reasons:

* ``lost``: the heartbeat found our claim superseded (write nothing more);
* ``time``: the job has run ``max_job_seconds`` (:class:`JobTimeLimitExceeded`);
* ``memory``: this process's resident memory passed ``max_worker_memory_mb`` (:class:`MemoryLimitExceeded`);
* ``cancelled``: the job row carries a cancel request (or no longer carries our token).

Cheap per call: a clock read; the database (one indexed read) and the process's RSS are read at
most every ``cancel_poll_s``.
"""

from __future__ import annotations

import time
from typing import Callable

import psutil

__all__ = ["JobGuard", "JobTimeLimitExceeded", "MemoryLimitExceeded", "memory_limit_bytes"]


class JobTimeLimitExceeded(Exception):
    """The job ran longer than ``ODEFORGE_MAX_JOB_SECONDS`` (it fails; its last checkpoint is kept)."""


class MemoryLimitExceeded(Exception):
    """The worker's resident memory passed ``ODEFORGE_MAX_WORKER_MEMORY_MB`` while the job ran (it
    fails; its last checkpoint is kept; the worker takes the next job)."""


def memory_limit_bytes(max_worker_memory_mb: int) -> int:
    """The RSS limit in bytes: the setting, or 80% of physical memory when it is 0."""
    if max_worker_memory_mb > 0:
        return int(max_worker_memory_mb) * 2**20
    return int(0.8 * psutil.virtual_memory().total)


class JobGuard:
    """``guard()`` -> True once the job must stop; ``reason`` says why, ``error()`` the failure to record.

    Args:
        poll_s: seconds between reads of ``should_cancel`` and of the RSS.
        seconds: wall-clock seconds the job may still run from now.
        memory_bytes: RSS limit of this process.
        should_cancel: reads the job row (True: cancel requested or claim superseded).
        lost: True when the heartbeat found the claim superseded (checked on every call).
    """

    def __init__(self, *, poll_s: float, seconds: float, memory_bytes: int, limit_seconds: float,
                 should_cancel: Callable[[], bool], lost: Callable[[], bool] = lambda: False):
        self.poll_s = poll_s
        self.deadline = time.monotonic() + seconds
        self.limit_seconds = limit_seconds
        self.memory_bytes = memory_bytes
        self.should_cancel = should_cancel
        self.lost = lost
        self.reason: str | None = None
        self.rss_mb: float | None = None
        self._last_poll = time.monotonic()
        self._process = psutil.Process()

    def __call__(self) -> bool:
        if self.reason is not None:
            return True
        if self.lost():
            self.reason = "lost"
        elif time.monotonic() >= self.deadline:
            self.reason = "time"
        elif time.monotonic() - self._last_poll >= self.poll_s:
            self._last_poll = time.monotonic()
            rss = self._process.memory_info().rss
            if rss > self.memory_bytes:
                self.reason, self.rss_mb = "memory", rss / 2**20
            elif self.should_cancel():
                self.reason = "cancelled"
        return self.reason is not None

    def error(self) -> Exception | None:
        """The named failure of a ``time`` or ``memory`` stop (None otherwise)."""
        if self.reason == "time":
            return JobTimeLimitExceeded(
                f"the job ran longer than its wall-clock limit of {self.limit_seconds:g} s "
                f"(ODEFORGE_MAX_JOB_SECONDS); it was stopped and keeps its last checkpoint")
        if self.reason == "memory":
            return MemoryLimitExceeded(
                f"the worker process reached {self.rss_mb:.0f} MiB of resident memory, above its limit of "
                f"{self.memory_bytes / 2**20:.0f} MiB (ODEFORGE_MAX_WORKER_MEMORY_MB); the job was stopped and "
                f"keeps its last checkpoint (a smaller batch_size, model or test set needs less)")
        return None
