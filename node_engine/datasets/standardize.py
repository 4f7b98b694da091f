"""Affine standardization z = (x − mean) / std and the seeded train/test split.

Models are trained on standardized data; the statistics travel with the checkpoint so that
log-densities are reported in the user's original coordinates by the change of variables
log p_x(x) = log p_z(z) + log|det ∂z/∂x| = log p_z(z) − Σ_d log std_d.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from node_engine.errors import DatasetError


@dataclass(frozen=True)
class Standardization:
    """Per-feature affine map. ``mean``, ``std``: (D,) float64 (D = 1 for a scalar image normalization)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, data: np.ndarray, *, per_feature: bool = True) -> "Standardization":
        """Statistics of ``data`` (N, D) (or any shape when ``per_feature=False``: one scalar pair)."""
        if per_feature:
            return cls(data.mean(axis=0).astype(np.float64), data.std(axis=0).astype(np.float64))
        return cls(np.array([data.mean()], dtype=np.float64), np.array([data.std()], dtype=np.float64))

    @classmethod
    def identity(cls, dim: int) -> "Standardization":
        """The identity map in ``dim`` dimensions (used for energy targets, which have fixed coordinates)."""
        return cls(np.zeros(dim), np.ones(dim))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Original (N, D) -> standardized (N, D), same dtype as ``x``."""
        return ((x - self.mean) / self.std).astype(x.dtype, copy=False)

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """Standardized (N, D) -> original (N, D)."""
        return (z * self.std + self.mean).astype(z.dtype, copy=False)

    def log_abs_det_jacobian(self, dim: int | None = None) -> float:
        """log|det ∂z/∂x| = −Σ log std (nats); a scalar normalization counts ``dim`` times."""
        total = -float(np.log(self.std).sum())
        if self.std.size == 1 and dim is not None:
            total *= dim
        return total

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (lists of floats)."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Standardization":
        """Inverse of :meth:`to_json`. Raises DatasetError for malformed or non-positive statistics."""
        try:
            mean = np.asarray(data["mean"], dtype=np.float64)
            std = np.asarray(data["std"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"malformed standardization statistics: {exc}") from exc
        if mean.shape != std.shape or mean.ndim != 1 or not np.all(np.isfinite(mean)) \
                or not np.all(np.isfinite(std)) or not np.all(std > 0):
            raise DatasetError("standardization statistics must be finite 1-D lists of equal length, std > 0")
        return cls(mean, std)


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split of ``n`` items. Returns (train indices, test indices), int64, disjoint.

    Raises:
        DatasetError: ``test_fraction`` outside (0, 1) or a split that would leave one side empty.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise DatasetError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n_test = int(round(n * float(test_fraction)))
    if n_test < 1 or n - n_test < 1:
        raise DatasetError(f"{n} examples with test_fraction={test_fraction} leave an empty train or test split")
    order = np.random.default_rng([int(seed), 0x5B1]).permutation(n)  # own stream: independent of the generator
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def as_tensor(x: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A contiguous torch tensor copy of ``x``."""
    return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype).clone()
