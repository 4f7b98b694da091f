"""Host-side arithmetic on per-row quantities (times, step sizes, error ratios, counters).

A joint solve has one row and keeps these as Python floats/ints/bools (a numpy op on a one-element
array costs ~2 µs here, a float op ~0.05 µs, and the joint loop's overhead is tuned); a per-sample
solve keeps (B_active,) numpy arrays. Python's operators (+, -, *, /, **, abs, comparisons, &, |)
act the same on both; these helpers cover the rest, so the loop and the controller are written once.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["where", "maximum", "minimum", "isfinite", "any_", "count", "nextafter", "next_time", "clip", "not_",
           "to_device"]


def where(c, a, b):
    """Elementwise ``a if c else b``."""
    if isinstance(c, np.ndarray):
        return np.where(c, a, b)
    return a if c else b


def maximum(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.maximum(a, b)
    return max(a, b)


def minimum(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.minimum(a, b)
    return min(a, b)


def clip(x, lo, hi):
    """min(hi, max(lo, x)) elementwise (NaN becomes lo for a float, stays NaN in an array)."""
    if isinstance(x, np.ndarray):
        return np.minimum(hi, np.maximum(lo, x))
    return min(hi, max(lo, x))


def isfinite(x):
    return np.isfinite(x) if isinstance(x, np.ndarray) else math.isfinite(x)


def any_(x) -> bool:
    return bool(x.any()) if isinstance(x, np.ndarray) else bool(x)


def count(x) -> int:
    """Number of True entries of a bool or bool array."""
    return int(x.sum()) if isinstance(x, np.ndarray) else int(bool(x))


def nextafter(x, toward):
    if isinstance(x, np.ndarray):
        return np.nextafter(x, toward)
    return math.nextafter(x, toward)


def next_time(x: float, toward: float, dtype: torch.dtype) -> float:
    """The time next to ``x`` towards ``toward`` in the dtype the field receives times in (a float64
    neighbour would round back to x in float32), as a float."""
    if dtype == torch.float64:
        return math.nextafter(x, toward)
    return float(torch.nextafter(torch.tensor(x, dtype=dtype), torch.tensor(toward, dtype=dtype)))


def not_(x):
    """Elementwise logical not (``~`` on a Python bool is an int)."""
    return ~x if isinstance(x, np.ndarray) else not x


def to_device(a: np.ndarray, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host array as a tensor on ``device`` without a stream synchronisation (``non_blocking``:
    a small pageable copy is staged at once, so the array may change afterwards). On the CPU it
    may share the array's memory."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(device, dtype, non_blocking=True)
