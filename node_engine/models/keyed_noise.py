"""Counter-based random numbers keyed by a point's own value: noise that does not depend on the batch.

A served answer must not depend on which other points share its request (issue 12, item 2). Noise
drawn from a generator stream over a batch breaks that: a point's Hutchinson ε (FFJORD, Grathwohl
et al. 2019, eq. 7) or base sample z(0) would depend on its position in the batch. Here every random
number is a pure function of a key and a counter instead (the idea of Philox/Threefry, Salmon et
al. 2011, "Parallel random numbers: as easy as 1, 2, 3"), with SplitMix64 (Steele et al. 2014) as
the mixing function:

* a point's key is a hash of the IEEE-754 float64 bytes of its coordinates and a fixed seed;
* a sample's key is a hash of (seed, sample index), so sample i of a seed is the same for every n;
* value j of stream s under key k is ``splitmix64(k ^ splitmix64(s · 2^32 + j))``.

Computed with numpy's wrapping uint64 arithmetic on the host (N·D words; negligible next to an ODE
solve), so the same key gives the same numbers on every device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["NOISE_SEED", "point_keys", "index_keys", "keyed_uniform", "keyed_noise", "keyed_normal"]

#: The fixed seed of served Hutchinson noise (any constant; part of what a served answer means).
NOISE_SEED = 0x0DEF0E6E

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on a uint64 array (wrapping arithmetic); a bijection of uint64."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def point_keys(x: Tensor, seed: int = NOISE_SEED) -> np.ndarray:
    """One uint64 key per row of ``x``, from the float64 bytes of the row and ``seed``.

    Args:
        x: (N, ...) real tensor; each row is flattened. Rows with equal values (after a cast to
            float64, which is exact for float32/float16) get equal keys, wherever they sit in a batch.
        seed: mixes into every key.
    Returns:
        (N,) uint64 numpy array.
    """
    words = np.ascontiguousarray(x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64).numpy())
    words = words.view(np.uint64)
    key = np.full(words.shape[0], np.uint64(seed % 2**64), dtype=np.uint64)
    for j in range(words.shape[1]):  # a chained hash: the key depends on every coordinate and its order
        key = _splitmix64(key ^ words[:, j])
    return key


def index_keys(seed: int, n: int) -> np.ndarray:
    """Keys of samples 0..n-1 of ``seed``: (n,) uint64; key i does not depend on n."""
    base = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
    return _splitmix64(base ^ np.arange(n, dtype=np.uint64))


def keyed_uniform(keys: np.ndarray, stream: int, width: int) -> np.ndarray:
    """(N, width) float64 uniforms in the open interval (0, 1), value j of ``stream`` under each key."""
    counters = (np.uint64(stream % 2**32) << np.uint64(32)) + np.arange(width, dtype=np.uint64)
    bits = _splitmix64(keys[:, None] ^ _splitmix64(counters)[None, :])
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def keyed_noise(keys: np.ndarray, stream: int, width: int, kind: str, *, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> Tensor:
    """Noise ε with E[ε] = 0, E[εεᵀ] = I per key: (N, width) tensor.

    Args:
        keys: (N,) uint64 keys (:func:`point_keys`, :func:`index_keys`).
        stream: separates independent draws under one key (e.g. the CNF block index).
        kind: "rademacher" (±1) or "gaussian" (Box–Muller of two keyed uniforms).
    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "rademacher":
        values = np.where(keyed_uniform(keys, stream, width) < 0.5, -1.0, 1.0)
    elif kind == "gaussian":
        values = keyed_normal_array(keys, stream, width)
    else:
        raise ValueError(f"noise must be 'rademacher' or 'gaussian', got {kind!r}")
    return torch.as_tensor(values, dtype=dtype).to(device)


def keyed_normal_array(keys: np.ndarray, stream: int, width: int) -> np.ndarray:
    """(N, width) float64 standard normals by Box–Muller (Box & Muller 1958) from keyed uniforms."""
    u1 = keyed_uniform(keys, 2 * stream, width)
    u2 = keyed_uniform(keys, 2 * stream + 1, width)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def keyed_normal(seed: int, n: int, dim: int, *, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """Base samples z_i ~ N(0, I_dim), i = 0..n-1, row i a function of (seed, i) only: (n, dim) tensor."""
    return torch.as_tensor(keyed_normal_array(index_keys(seed, n), 0, dim), dtype=dtype).to(device)
