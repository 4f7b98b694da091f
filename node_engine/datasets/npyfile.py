"""Reading user-supplied ``.npy`` / ``.npz`` files without trusting their headers.

``np.load`` allocates what a header declares before it reads the data: a 160-byte file declaring
10^12 rows asks for terabytes (a MemoryError, or worse, memory the kernel grants lazily), and a
malformed header raises whatever ``ast``/``tokenize`` raise. Here the header is parsed first, every
failure is a :class:`~node_engine.errors.DatasetError` naming the problem, and the array is read
only when shape × itemsize equals the bytes that actually follow the header. Pickled (object)
arrays are refused, never loaded.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npformat

from node_engine.errors import DatasetError

MAX_HEADER_BYTES = 10_000  #: numpy's own default limit on the header's dict literal
MAX_MEMBER_BYTES = 256 * 2**20  #: an .npz member inflating beyond this is refused (zip bombs)


def read_npy_stream(handle: BinaryIO, data_bytes: int, what: str) -> np.ndarray:
    """The array of an ``.npy`` stream whose total size is ``data_bytes``.

    Args:
        handle: positioned at the magic string.
        data_bytes: the stream's size in bytes (a file's size, a zip member's uncompressed size).
        what: how messages name the file (e.g. ``"uploaded data set"``).
    Returns:
        The array with the header's shape and dtype (numeric or bool dtypes only).
    Raises:
        DatasetError: not an ``.npy``, a malformed header, an object (pickled) dtype, or a declared
            size (shape × itemsize) different from the bytes that follow the header.
    """
    try:
        version = npformat.read_magic(handle)
        read_header = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle, max_header_size=MAX_HEADER_BYTES)
    except Exception as exc:  # noqa: BLE001 - ValueError, SyntaxError, tokenize errors, EOF: all "malformed"
        raise DatasetError(f"{what}: malformed .npy header ({type(exc).__name__}: {exc})"[:500]) from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise DatasetError(f"{what}: numeric .npy expected, got dtype {dtype} (object arrays are never loaded)")
    count = math.prod(int(s) for s in shape)  # Python ints: no overflow however large the header says
    declared = count * dtype.itemsize
    available = data_bytes - handle.tell()
    if declared != available:
        raise DatasetError(f"{what}: the .npy header declares shape {tuple(shape)} of {dtype} ({declared} bytes) "
                           f"but {max(available, 0)} bytes of data follow it")
    data = handle.read(declared)
    if len(data) != declared:
        raise DatasetError(f"{what}: truncated .npy ({len(data)} of {declared} data bytes)")
    array = np.frombuffer(data, dtype=dtype, count=count)
    return array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)


def read_npy(path: str | os.PathLike, what: str = "uploaded data set") -> np.ndarray:
    """The array of an ``.npy`` file (see :func:`read_npy_stream`). Raises DatasetError."""
    path = Path(path)
    with path.open("rb") as handle:
        return read_npy_stream(handle, path.stat().st_size, what)


def read_npz(path: str | os.PathLike, what: str = "uploaded series",
             max_member_bytes: int = MAX_MEMBER_BYTES) -> dict[str, np.ndarray]:
    """``{name: array}`` of an ``.npz`` archive, each member read by :func:`read_npy_stream` against
    its uncompressed size. Raises DatasetError: not a zip archive, a member larger than
    ``max_member_bytes`` uncompressed, or a member that is not a valid ``.npy``."""
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if info.file_size > max_member_bytes:
                    raise DatasetError(f"{what}: member {name!r} inflates to {info.file_size} bytes; "
                                       f"at most {max_member_bytes}")
                with archive.open(info) as member:
                    arrays[name] = read_npy_stream(member, info.file_size, f"{what}: member {name!r}")
    except DatasetError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        raise DatasetError(f"{what}: cannot read {Path(path).name} as .npz: {exc}") from None
    return arrays
