"""The states of a training job, the one place their names are written.

``JobStatus`` is a ``str`` enum: a member compares and hashes equal to its value (``JobStatus.QUEUED
== "queued"``), is stored as that value in the ``jobs.status`` column and serialised as it in JSON, so
the HTTP contract and the database rows are exactly what they were when the values were plain strings.

Life of a job::

    queued --claim--> running --finish--> succeeded | failed | cancelled
      ^                  |
      +--release/requeue-+      (graceful worker stop, or a lost worker's lease expired)
    queued --cancel--> cancelled
"""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    """Status of a job row (``jobs.status``) and of ``JobPublic.status`` in the API."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    # str(), f-strings and Prometheus labels give the value on every Python version (3.12 changed
    # the default for mixed-in enums to "JobStatus.QUEUED").
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def terminal(self) -> bool:
        """True for the states a job never leaves (succeeded, failed, cancelled)."""
        return self in TERMINAL


TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
