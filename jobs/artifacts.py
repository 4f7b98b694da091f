"""Artifact store: checkpoints and uploaded data sets, addressed by slash-separated keys.

``ArtifactStore`` is the interface (an S3-compatible store can implement it later: keys map to
object names); ``LocalArtifactStore`` keeps artifacts in a directory. Keys are validated so that no
key, however crafted (``..``, absolute paths, backslashes, NUL), can reach outside the root.

Key layout (built only by the functions at the end of this module): ``jobs/{job_id}/checkpoints/
{name}.safetensors`` (:func:`checkpoint_key`), ``datasets/{id}.npy`` (:func:`dataset_key`).

Links are never followed out of the root: a key whose folder resolves outside it, or whose object is
a symbolic link (someone replaced a checkpoint by a link to ``/etc/passwd``), reads as absent
(``exists`` False, ``get``/``local_path`` ``FileNotFoundError``, left out of ``list``); the object
itself is opened with ``O_NOFOLLOW``. A write that finds the disk full raises
:class:`InsufficientStorage` (the API answers 507). :func:`save_checkpoint` writes a checkpoint and
prunes the older periodic ones (:func:`prune_checkpoints`: the last ``keep`` plus ``final``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator, Protocol

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class InvalidArtifactKey(ValueError):
    """A key that is empty, absolute, or has a segment outside ``[A-Za-z0-9._-]`` or equal to ``..``."""


def validate_key(key: str) -> list[str]:
    """Split ``key`` into safe segments or raise ``InvalidArtifactKey``."""
    parts = key.split("/")
    if not key or any(not _SEGMENT.match(p) or p in (".", "..") or ".." in p for p in parts):
        raise InvalidArtifactKey(f"invalid artifact key {key!r}")
    return parts


class InsufficientStorage(OSError):
    """A write found no space left (``ENOSPC``) or the file-system quota exhausted (``EDQUOT``).

    An ``OSError`` with the original ``errno``; the API answers 507 ``insufficient-storage``.
    """


#: errno values that mean "the disk (or the user's file-system quota) is full"
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class ArtifactStore(Protocol):
    """Where checkpoints and data sets live. Every method raises ``InvalidArtifactKey`` for bad keys."""

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (readers see the old or the new bytes, never half).

        Raises InsufficientStorage when the disk is full (nothing is left behind)."""

    def get(self, key: str) -> bytes:
        """The bytes under ``key``; ``FileNotFoundError`` if absent."""

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[tuple[str, int]]:
        """``(name, size_bytes)`` of the objects directly under ``prefix/``, sorted by name."""

    def delete(self, key: str) -> None: ...

    def size(self, key: str) -> int:
        """Bytes of the object under ``key``, 0 if absent."""

    def free_bytes(self) -> int:
        """Bytes free for new artifacts on the store's disk (for readiness and admission)."""

    def local_path(self, key: str) -> contextlib.AbstractContextManager[Path]:
        """A context manager yielding a local file path with the object's bytes (for node_engine)."""


class LocalArtifactStore:
    """``ArtifactStore`` on a local directory (the embedded default; a shared volume in production)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        """The file of ``key``: its folder resolved (links followed) must stay inside the root;
        the last segment is not resolved (readers open it with ``O_NOFOLLOW``).

        Raises InvalidArtifactKey for a malformed key, FileNotFoundError when its folder leads out
        of the root (a link planted in the store reads as "no such artifact", never as its target).
        """
        parts = validate_key(key)
        folder = self.root.joinpath(*parts[:-1]).resolve()
        if folder != self.root and self.root not in folder.parents:
            raise FileNotFoundError(errno.ENOENT, "artifact folder leads out of the artifact directory", key)
        return folder / parts[-1]

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # replaces a link planted at ``path`` itself, never writes through it
        except BaseException as exc:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
                raise InsufficientStorage(exc.errno, f"no space left for artifact {key!r} ({len(data)} bytes): "
                                          f"{os.strerror(exc.errno)}") from exc
            raise

    def _open(self, key: str) -> int:
        """A read-only descriptor of the regular file under ``key``; FileNotFoundError for anything else."""
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
                raise FileNotFoundError(errno.ENOENT, "no such artifact", key) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FileNotFoundError(errno.ENOENT, "no such artifact", key)
        return fd

    def get(self, key: str) -> bytes:
        with os.fdopen(self._open(key), "rb") as f:
            return f.read()

    def _regular(self, key: str) -> os.stat_result | None:
        """``lstat`` of the object if it is a regular file (not a link) inside the root, else None."""
        try:
            st = os.lstat(self._path(key))
        except FileNotFoundError:
            return None
        return st if stat.S_ISREG(st.st_mode) else None

    def exists(self, key: str) -> bool:
        return self._regular(key) is not None

    def size(self, key: str) -> int:
        st = self._regular(key)
        return st.st_size if st is not None else 0

    def list(self, prefix: str) -> list[tuple[str, int]]:
        try:
            d = self._path(prefix)
            entries = list(os.scandir(d)) if d.is_dir() and not d.is_symlink() else []
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            if e.name.startswith("."):
                continue
            st = e.stat(follow_symlinks=False)  # a link is not an object of the store
            if stat.S_ISREG(st.st_mode):
                out.append((e.name, st.st_size))
        return sorted(out)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()  # unlinks a link itself, never its target

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    @contextlib.contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        if not self.exists(key):
            raise FileNotFoundError(errno.ENOENT, "no such artifact", key)
        yield self._path(key)


def checkpoint_prefix(job_id: str) -> str:
    """The folder key of a job's checkpoints (list it with ``ArtifactStore.list``)."""
    return f"jobs/{job_id}/checkpoints"


def checkpoint_key(job_id: str, name: str) -> str:
    """The key of checkpoint ``name`` (``step-000100.safetensors``, ``final.safetensors``) of a job."""
    return f"{checkpoint_prefix(job_id)}/{name}"


#: upload data-set name -> the stored file's suffix: "upload" an (N, D) float array saved with
#: ``np.save``, "series_upload" time series saved with ``np.savez`` (t, y, mask; no pickles)
UPLOAD_SUFFIXES = {"upload": "npy", "series_upload": "npz"}


def dataset_key(dataset_id: str, name: str = "upload") -> str:
    """The key of uploaded data set ``dataset_id`` of data-set name ``name`` (``UPLOAD_SUFFIXES``)."""
    return f"datasets/{dataset_id}.{UPLOAD_SUFFIXES[name]}"


def latest_checkpoint(store: ArtifactStore, job_id: str) -> str | None:
    """Name of the newest checkpoint of a job: ``final.safetensors`` if present, else the highest step."""
    names = [n for n, _ in store.list(checkpoint_prefix(job_id)) if n.endswith(".safetensors")]
    if not names:
        return None
    if "final.safetensors" in names:
        return "final.safetensors"
    # "step-000100.safetensors": zero-padded, but sort by the number to be safe with wider steps.
    return max(names, key=_step_of)


def _step_of(name: str) -> int:
    m = re.search(r"(\d+)", name)
    return int(m.group(1)) if m else -1


def prune_checkpoints(store: ArtifactStore, job_id: str, keep: int) -> list[str]:
    """Delete a job's periodic checkpoints but its newest ``keep`` (by step); ``final`` is always kept.

    Returns the names deleted. ``keep`` >= 1, so the checkpoint a resume would use (the newest)
    survives. Why: every ``checkpoint_every`` steps a job writes one, and kept forever they fill the disk.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    periodic = [n for n, _ in store.list(checkpoint_prefix(job_id))
                if n.endswith(".safetensors") and n != "final.safetensors"]
    doomed = sorted(periodic, key=_step_of)[:-keep]
    for name in doomed:
        store.delete(checkpoint_key(job_id, name))
    return doomed


def save_checkpoint(store: ArtifactStore, job_id: str, name: str, data: bytes, *, keep: int) -> None:
    """Store checkpoint ``name`` of a job, then prune its periodic ones to the newest ``keep``
    (:func:`prune_checkpoints`). Raises InsufficientStorage when the disk is full."""
    store.put(checkpoint_key(job_id, name), data)
    prune_checkpoints(store, job_id, keep)


def plots_prefix(job_id: str) -> str:
    """The folder key of a job's cached figures (``service.plots``; removed with the job)."""
    return f"jobs/{job_id}/plots"


def plot_key(job_id: str, name: str) -> str:
    """The key of cached figure ``name`` (``density-final-v1.png``) of a job."""
    return f"{plots_prefix(job_id)}/{name}"
