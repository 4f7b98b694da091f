"""Worker liveness: a heartbeat row each worker process writes, read by ``/readyz``.

Why a row and not a Celery ``ping``: a worker runs one job at a time in the solo pool, so while it
trains its consumer cannot answer a broadcast (a busy worker would read as dead), and a broadcast on
a Redis shared by several deployments is answered by their workers too. The row is written by a
daemon thread, whatever the job does, in the job store every deployment already has (SQLite in the
embedded default, PostgreSQL in production), keyed by the Celery node name and tagged with the queue.

A worker is live when its row is younger than :data:`STALE_PERIODS` heartbeat periods. A clean stop
deletes the row (``/readyz`` knows at once); a killed worker's row just ages out.
"""

from __future__ import annotations

import logging
import os
import threading

from jobs.store import JobStore

log = logging.getLogger("odeforge.worker")

#: a heartbeat older than this many periods means the worker is gone
STALE_PERIODS = 3.0


def stale_after_s(every_s: float) -> float:
    """Age (seconds) past which a heartbeat written every ``every_s`` seconds is a dead worker's."""
    return STALE_PERIODS * every_s


class Heartbeat(threading.Thread):
    """Daemon thread: ``store.beat(name, queue, pid)`` every ``every_s`` seconds until :meth:`stop`.

    A failed write (database down or full) is logged and retried at the next period: liveness is
    then unknown to the API, which says not ready, which is the truth as far as it can tell.
    """

    def __init__(self, store: JobStore, name: str, queue: str, every_s: float):
        super().__init__(name="odeforge-heartbeat", daemon=True)
        self.store, self.node, self.queue, self.every_s = store, name, queue, every_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        failing = False
        while True:
            try:
                self.store.beat(self.node, self.queue, os.getpid())
                failing = False
            except Exception as exc:  # any driver error: try again next period
                if not failing:
                    log.warning("worker heartbeat not written: %s", str(exc).splitlines()[0] if str(exc) else exc)
                failing = True
            if self._stop_event.wait(self.every_s):
                return

    def stop(self) -> None:
        """Stop beating and delete the row (the API sees this worker gone at once)."""
        self._stop_event.set()
        self.join(timeout=5)
        try:
            self.store.forget_worker(self.node)
        except Exception:  # the row then ages out
            pass
