"""The worker's side of a job lease: a heartbeat that keeps the claim alive while a job trains.

Renewal runs in its own thread, not between training steps: one step (or one evaluation on a large
test set) may take longer than the lease, and a worker that is merely slow must not look dead. The
thread dies with the process, so a SIGKILLed or crashed worker stops renewing and the reconciler
requeues its job once the lease expires. When a renewal finds the claim gone (the job was requeued
to another worker, cancelled or finished), :attr:`LeaseKeeper.lost` is set and the training loop
stops at its next step; its writes would be refused anyway (fencing token).
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy.orm import sessionmaker

from service.leases import renew

log = logging.getLogger("odeforge.worker")


class LeaseKeeper:
    """Renews the lease of ``(job_seq, token)`` every ``lease / 3`` until stopped or lost."""

    def __init__(self, sessions: sessionmaker, job_seq: int, token: int, lease: timedelta):
        self.sessions, self.job_seq, self.token, self.lease = sessions, job_seq, token, lease
        self.lost = threading.Event()  # our claim was superseded (or the job ended elsewhere)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_seq}", daemon=True)

    def _run(self) -> None:
        interval = self.lease.total_seconds() / 3
        while not self._stop.wait(interval):
            try:
                if not renew(self.sessions, self.job_seq, self.token, self.lease):
                    log.warning("job #%d: lease lost (token %d superseded); stopping", self.job_seq, self.token)
                    self.lost.set()
                    return
            except Exception as exc:  # database briefly unreachable: keep trying until the lease runs out
                log.warning("job #%d: lease renewal failed: %s: %s", self.job_seq, type(exc).__name__, exc)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
