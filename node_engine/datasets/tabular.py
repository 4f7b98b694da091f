"""User-supplied tabular data (``.npy`` or CSV, N x D) for density estimation, validated before use."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from node_engine.datasets.npyfile import read_npy
from node_engine.errors import DatasetError

MAX_FILE_BYTES = 256 * 2**20  #: larger files are refused before being read
MAX_ROWS = 1_000_000
MAX_DIM = 256
MIN_ROWS = 10  #: fewer rows cannot give a train and a test split


def load_array(path: str | os.PathLike, dtype: np.dtype | type | None = np.float64) -> np.ndarray:
    """Read and validate an N x D array from ``.npy`` (no pickles) or CSV (comma-separated, optional header).

    Returns:
        (N, D) in ``dtype`` (float64 for training); ``dtype=None`` keeps the file's own dtype
        (CSV: float64), which is how an upload is stored in its own precision (:func:`storage_dtype`).

    Raises:
        DatasetError: missing file, unsupported suffix, too large, not 2-D, non-numeric, NaN/inf,
            fewer than ``MIN_ROWS`` rows, or a constant column (which has no density).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"uploaded data set: file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DatasetError(f"uploaded data set: {size} bytes exceeds the limit of {MAX_FILE_BYTES} bytes")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            data = read_npy(path, f"uploaded data set: {path.name}")  # header checked against the size; no pickles
        elif suffix in (".csv", ".txt"):
            data = _read_csv(path)
        else:
            raise DatasetError(f"uploaded data set: unsupported file type {suffix!r}; use .npy or .csv")
    except DatasetError:
        raise
    except (ValueError, OSError) as exc:
        raise DatasetError(f"uploaded data set: cannot parse {path.name}: {exc}") from exc
    return validate_array(data, dtype)


def _read_csv(path: Path) -> np.ndarray:
    with path.open("r", encoding="utf-8", errors="strict") as handle:
        first = handle.readline()
    try:
        [float(cell) for cell in first.strip().split(",")]
        skip = 0
    except ValueError:
        skip = 1  # a header row of column names
    return np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)


def validate_array(data: np.ndarray, dtype: np.dtype | type | None = np.float64) -> np.ndarray:
    """Check shape, dtype, finiteness and variability of an (N, D) array; return it as ``dtype``
    (float64 by default; None: its own dtype). The checks run in the array's own dtype, so a
    64 MB int8 upload is never widened to 512 MB of float64 to be validated.

    Raises:
        DatasetError: see :func:`load_array`.
    """
    data = np.asarray(data)
    if data.dtype.kind not in "biuf":
        raise DatasetError(f"uploaded data set: numeric array expected, got dtype {data.dtype}")
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2:
        raise DatasetError(f"uploaded data set: a 2-D array (N rows, D columns) expected, got shape {data.shape}")
    n, d = data.shape
    if not MIN_ROWS <= n <= MAX_ROWS:
        raise DatasetError(f"uploaded data set: {n} rows; between {MIN_ROWS} and {MAX_ROWS} are accepted")
    if not 1 <= d <= MAX_DIM:
        raise DatasetError(f"uploaded data set: {d} columns; between 1 and {MAX_DIM} are accepted")
    if data.dtype.kind == "f":  # integers and booleans are finite
        bad = ~np.isfinite(data)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise DatasetError(f"uploaded data set: {int(bad.sum())} non-finite values (NaN/inf), "
                               f"first at row {row}, column {col}")
    # max == min, exact in any dtype (a float16 std would overflow, a bool one is undefined)
    constant = np.flatnonzero(data.max(axis=0) == data.min(axis=0))
    if constant.size:
        raise DatasetError(f"uploaded data set: column(s) {constant.tolist()} are constant; a density "
                           f"over them does not exist (drop them)")
    return data if dtype is None else data.astype(dtype)


#: kinds stored as uploaded when no wider than float32 (4 bytes)
_KEPT_KINDS = {"b", "i", "u", "f"}
STORAGE_DTYPES = ("float16", "float32", "float64")  #: what an upload may ask to be stored as


def storage_dtype(dtype: np.dtype, requested: str | None = None) -> np.dtype:
    """The dtype an uploaded (N, D) array of ``dtype`` is stored in.

    ``requested`` (one of :data:`STORAGE_DTYPES`) is obeyed. Otherwise the upload keeps its own
    precision, at most float32: bool, (u)int8/16/32, float16 and float32 are kept as they are
    (training widens them to float64 when it loads them), float64 and 64-bit integers become
    float32 (ask for ``float64`` to keep them). Why: a 64 MB bool ``.npy`` stored as float64 took
    512 MB; float32's 24-bit mantissa is far finer than the noise of data a density model learns.

    Raises:
        ValueError: ``requested`` not in :data:`STORAGE_DTYPES`.
    """
    if requested is not None:
        if requested not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {requested!r}")
        return np.dtype(requested)
    dtype = np.dtype(dtype)
    if dtype.kind in _KEPT_KINDS and dtype.itemsize <= 4:
        return dtype.newbyteorder("=")  # stored native-endian
    return np.dtype(np.float32)
