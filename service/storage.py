"""Storage admission: whether an upload or a submission may use the artifact disk, answered 507.

Two limits, both ``507 Insufficient Storage`` problems (RFC 4918 §11.5: the server cannot store what
the request needs; RFC 4331 §6 uses 507 for an exhausted quota too). 413 stays what it was: *this
request's* body is over ``max_upload_bytes``, whatever is stored already.

- ``insufficient-storage``: the artifact disk has less than ``min_free_bytes`` free (after this
  upload), or a write found it full (``ENOSPC``), or the database's disk is full (see
  :mod:`service.outages`).
- ``quota-exceeded``: the owner's uploads plus its jobs' checkpoints would pass
  ``owner_quota_bytes``. Usage is counted from the artifact store itself (file sizes), so it is never
  out of step with what is on disk; the checkpoint retention (``checkpoint_keep``) bounds a job's share.

Each problem names the limit and what is used in its ``errors`` (field ``storage`` or ``quota``).
"""

from __future__ import annotations

from jobs.artifacts import ArtifactStore, checkpoint_prefix, dataset_key
from jobs.store import JobStore
from service.errors import ProblemError

#: rank of a data set's stored shape -> its upload name (the key's suffix)
_UPLOAD_NAME_BY_RANK = {2: "upload", 3: "series_upload"}


def insufficient_storage(reason: str) -> ProblemError:
    """The 507 ``insufficient-storage`` problem, ``reason`` in its detail and its ``storage`` field."""
    return ProblemError(507, "insufficient-storage", f"not enough storage: {reason}",
                        errors=[{"field": "storage", "reason": reason}])


class StorageGuard:
    """Checks the artifact disk's free space and the owner's quota before new data is accepted."""

    def __init__(self, store: JobStore, artifacts: ArtifactStore, *, quota_bytes: int, min_free_bytes: int):
        self.store, self.artifacts = store, artifacts
        self.quota_bytes, self.min_free_bytes = quota_bytes, min_free_bytes

    def usage(self, owner: str | None) -> int:
        """Bytes ``owner`` keeps: its data sets plus every checkpoint of its jobs."""
        job_ids, datasets = self.store.owner_artifacts(owner)
        used = sum(size for job_id in job_ids for _, size in self.artifacts.list(checkpoint_prefix(job_id)))
        for dataset_id, rank in datasets:
            name = _UPLOAD_NAME_BY_RANK.get(rank)
            if name is not None:
                used += self.artifacts.size(dataset_key(dataset_id, name))
        return used

    def admit(self, owner: str | None, incoming_bytes: int = 0) -> None:
        """Raise the 507 problem unless ``incoming_bytes`` more fit on the disk (keeping
        ``min_free_bytes`` free) and within ``owner``'s quota. A submission passes 0: it is refused
        once the owner is at or past the quota (its checkpoints would add to it)."""
        free = self.artifacts.free_bytes()
        if free - incoming_bytes < self.min_free_bytes:
            raise insufficient_storage(f"the artifact disk has {free} bytes free; {incoming_bytes} more would leave "
                                       f"less than ODEFORGE_MIN_FREE_BYTES={self.min_free_bytes}")
        if self.quota_bytes:
            used = self.usage(owner)
            if used + incoming_bytes > self.quota_bytes or (incoming_bytes == 0 and used >= self.quota_bytes):
                reason = (f"{used} bytes used (uploads and checkpoints) + {incoming_bytes} requested exceeds "
                          f"ODEFORGE_OWNER_QUOTA_BYTES={self.quota_bytes}")
                raise ProblemError(507, "quota-exceeded", f"storage quota exceeded: {reason}",
                                   errors=[{"field": "quota", "reason": reason}])
