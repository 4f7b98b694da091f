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


def load_array(path: str | os.PathLike) -> np.ndarray:
    """Read and validate an N x D array from ``.npy`` (no pickles) or CSV (comma-separated, optional header).

    Returns:
        (N, D) float64.

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
    return validate_array(data)


def _read_csv(path: Path) -> np.ndarray:
    with path.open("r", encoding="utf-8", errors="strict") as handle:
        first = handle.readline()
    try:
        [float(cell) for cell in first.strip().split(",")]
        skip = 0
    except ValueError:
        skip = 1  # a header row of column names
    return np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)


def validate_array(data: np.ndarray) -> np.ndarray:
    """Check shape, dtype, finiteness and variability of an (N, D) array; return it as float64.

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
    data = data.astype(np.float64)
    bad = ~np.isfinite(data)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DatasetError(f"uploaded data set: {int(bad.sum())} non-finite values (NaN/inf), "
                           f"first at row {row}, column {col}")
    constant = np.flatnonzero(data.std(axis=0) == 0)
    if constant.size:
        raise DatasetError(f"uploaded data set: column(s) {constant.tolist()} are constant; a density "
                           f"over them does not exist (drop them)")
    return data
