"""Artifact store: checkpoints and uploaded data sets, addressed by slash-separated keys.

``ArtifactStore`` is the interface (an S3-compatible store can implement it later: keys map to
object names); ``LocalArtifactStore`` keeps artifacts in a directory. Keys are validated so that no
key, however crafted (``..``, absolute paths, backslashes, NUL), can reach outside the root.

Key layout (built only by the functions at the end of this module): ``jobs/{job_id}/checkpoints/
{name}.safetensors`` (:func:`checkpoint_key`), ``datasets/{id}.npy`` (:func:`dataset_key`).
"""

from __future__ import annotations

import contextlib
import os
import re
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


class ArtifactStore(Protocol):
    """Where checkpoints and data sets live. Every method raises ``InvalidArtifactKey`` for bad keys."""

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (readers see the old or the new bytes, never half)."""

    def get(self, key: str) -> bytes:
        """The bytes under ``key``; ``FileNotFoundError`` if absent."""

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[tuple[str, int]]:
        """``(name, size_bytes)`` of the objects directly under ``prefix/``, sorted by name."""

    def delete(self, key: str) -> None: ...

    def local_path(self, key: str) -> contextlib.AbstractContextManager[Path]:
        """A context manager yielding a local file path with the object's bytes (for node_engine)."""


class LocalArtifactStore:
    """``ArtifactStore`` on a local directory (the embedded default; a shared volume in production)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = self.root.joinpath(*validate_key(key)).resolve()
        # Defence in depth: symlinks inside the root must not lead out of it either.
        if self.root not in path.parents:
            raise InvalidArtifactKey(f"artifact key {key!r} leaves the artifact directory")
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[tuple[str, int]]:
        d = self._path(prefix)
        if not d.is_dir():
            return []
        return sorted((p.name, p.stat().st_size) for p in d.iterdir() if p.is_file() and not p.name.startswith("."))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    @contextlib.contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        yield path


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
    def step_of(name: str) -> int:
        m = re.search(r"(\d+)", name)
        return int(m.group(1)) if m else -1

    return max(names, key=step_of)


def plots_prefix(job_id: str) -> str:
    """The folder key of a job's cached figures (``service.plots``; removed with the job)."""
    return f"jobs/{job_id}/plots"


def plot_key(job_id: str, name: str) -> str:
    """The key of cached figure ``name`` (``density-final-v1.png``) of a job."""
    return f"{plots_prefix(job_id)}/{name}"
