"""Time series (data-set kind ``timeseries``): N series, each with its own irregular times.

A set of series is held padded (:class:`SeriesSet`): ``t`` (N, T) float64 (padding past a series'
``lengths[i]`` repeats its last time and is never read), ``y`` (N, T, D) float64 (0 where missing),
``mask`` (N, T, D) bool (True = observed). Masks and per-series times are what the ``node`` family
uses and what latent models (ODE-RNN encoders, Rubanova et al. 2019) need too.

Built-in generators with known true dynamics (``TRUE_FIELDS``, for tests and vector-field errors):

* ``spirals``: Chen et al. 2018 §5.1: clockwise and counter-clockwise Archimedean 2-D spirals
  (their ``latent_ode.py`` construction), observed at irregularly subsampled times of a window of
  the dense curve, with Gaussian noise (std 0.1 in their code; here ``SPIRAL_NOISE``).
* ``lotka_volterra``: dx/dt = αx − βxy, dy/dt = δxy − γy (α, β, γ, δ = 2/3, 4/3, 1, 1).
* ``damped_oscillator``: x'' + 2ζω x' + ω² x = 0 as (x, v), ω = 1, ζ = 0.1.
* ``van_der_pol``: x' = v, v' = μ(1 − x²)v − x, μ = 1.

ODE series are solved with scipy's DOP853 (rtol 1e-10) on a dense grid and each series keeps
``n_points`` irregular grid times (its own random subset); noise is added after.

Uploads: CSV in long format (``series_id, t, y1, ..., yD``, header optional, an empty cell is a
missing value) or ``.npz`` (``t`` (N, T), ``y`` (N, T, D), optional ``mask`` (N, T, D); trailing NaN
times pad shorter series; NaN in ``y`` is a missing value). Never unpickled.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node_engine.errors import DatasetError

MAX_FILE_BYTES = 256 * 2**20
MAX_SERIES = 20_000
MAX_POINTS_PER_SERIES = 2_000
MAX_DIM = 64
MAX_VALUES = 20_000_000  #: N x T x D of the padded arrays
MIN_SERIES = 2  #: a train and a test series
N_POINTS = 30  #: observations per generated series
DENSE_POINTS = 200  #: the dense grid generated series are subsampled from
CONTEXT_FRACTION = 0.75  #: share of a generated series' points used for fitting; the rest are extrapolated
SPIRAL_NOISE = 0.1
ODE_NOISE = 0.01


@dataclass
class SeriesSet:
    """Padded series. ``t`` (N, T) float64, ``y`` (N, T, D) float64, ``mask`` (N, T, D) bool,
    ``lengths`` (N,) int64 (points per series; every series has >= 2)."""

    t: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray

    @property
    def n(self) -> int:
        return int(self.t.shape[0])

    @property
    def dim(self) -> int:
        return int(self.y.shape[2])

    def subset(self, idx: np.ndarray) -> "SeriesSet":
        """Series ``idx`` (trimmed to their longest length)."""
        lengths = self.lengths[idx]
        width = int(lengths.max())
        return SeriesSet(self.t[idx, :width], self.y[idx, :width], self.mask[idx, :width], lengths)


# ---- true dynamics ------------------------------------------------------------------------------
LV = (2.0 / 3.0, 4.0 / 3.0, 1.0, 1.0)
OSC_OMEGA, OSC_ZETA = 1.0, 0.1
VDP_MU = 1.0


def lotka_volterra_field(t: float, y: np.ndarray) -> np.ndarray:
    """dy/dt of Lotka–Volterra; ``y`` (2, ...) (prey, predator)."""
    a, b, c, d = LV
    return np.stack([a * y[0] - b * y[0] * y[1], d * y[0] * y[1] - c * y[1]])


def damped_oscillator_field(t: float, y: np.ndarray) -> np.ndarray:
    """dy/dt of x'' + 2ζωx' + ω²x = 0; ``y`` (2, ...) (x, v)."""
    return np.stack([y[1], -2.0 * OSC_ZETA * OSC_OMEGA * y[1] - OSC_OMEGA ** 2 * y[0]])


def van_der_pol_field(t: float, y: np.ndarray) -> np.ndarray:
    """dy/dt of the Van der Pol oscillator; ``y`` (2, ...) (x, v)."""
    return np.stack([y[1], VDP_MU * (1.0 - y[0] ** 2) * y[1] - y[0]])


#: name -> (field(t, y (D, ...)) -> (D, ...), time span, initial-state sampler (rng, n) -> (n, D))
_ODES: dict[str, tuple[Callable, float, Callable]] = {
    "lotka_volterra": (lotka_volterra_field, 15.0, lambda rng, n: rng.uniform(0.5, 2.0, size=(n, 2))),
    "damped_oscillator": (damped_oscillator_field, 20.0, lambda rng, n: rng.uniform(-2.0, 2.0, size=(n, 2))),
    "van_der_pol": (van_der_pol_field, 15.0, lambda rng, n: rng.uniform(-2.5, 2.5, size=(n, 2))),
}
TRUE_FIELDS: dict[str, Callable] = {name: entry[0] for name, entry in _ODES.items()}


def _irregular_indices(rng: np.random.Generator, n: int, width: int, k: int) -> np.ndarray:
    """(n, k) sorted distinct indices in [0, width), index 0 always kept (each row its own subset)."""
    rest = np.argsort(rng.random((n, width - 1)), axis=1)[:, :k - 1] + 1
    return np.sort(np.concatenate([np.zeros((n, 1), dtype=np.int64), rest], axis=1), axis=1)


def generate_ode(name: str, n_series: int, seed: int, *, n_points: int = N_POINTS,
                 noise: float = ODE_NOISE) -> tuple[np.ndarray, np.ndarray]:
    """``n_series`` noisy trajectories of ODE ``name`` at irregular times.

    Returns:
        t (N, n_points) float64 (series i's own times, t[i, 0] = 0), y (N, n_points, 2) float64.
    Raises:
        DatasetError: unknown name or sizes out of bounds.
    """
    from scipy.integrate import solve_ivp

    if name not in _ODES:
        raise DatasetError(f"unknown time-series generator {name!r}")
    if not 2 <= n_points <= DENSE_POINTS:
        raise DatasetError(f"dataset.n_points must lie in [2, {DENSE_POINTS}] for {name!r}, got {n_points}")
    field, span, initial = _ODES[name]
    rng = np.random.default_rng([int(seed), 0x75E])
    y0 = initial(rng, n_series)
    grid = np.linspace(0.0, span, DENSE_POINTS)

    def rhs(t, flat):
        return field(t, flat.reshape(n_series, 2).T).T.reshape(-1)

    sol = solve_ivp(rhs, (0.0, span), y0.reshape(-1), method="DOP853", t_eval=grid, rtol=1e-10, atol=1e-10)
    if not sol.success:  # pragma: no cover - the built-in systems are non-stiff on these spans
        raise DatasetError(f"generator {name!r}: {sol.message}")
    dense = sol.y.reshape(n_series, 2, DENSE_POINTS).transpose(0, 2, 1)  # (N, G, 2)
    idx = _irregular_indices(rng, n_series, DENSE_POINTS, n_points)
    y = np.take_along_axis(dense, idx[:, :, None], axis=1)
    return grid[idx], y + noise * rng.standard_normal(y.shape)


def spiral_curves(n_total: int = 1000, start: float = 0.0, stop: float = 6 * np.pi, a: float = 0.0,
                  b: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two dense spirals of Chen et al. 2018 (``latent_ode.py``: ``generate_spiral2d``).

    Returns:
        times (n_total,), counter-clockwise curve (n_total, 2): r = a + b θ, centre (5, 0), and
        clockwise curve (n_total, 2): r = a + 50 b / θ', θ' = stop + 1 − t, centre (−5, 0).
    """
    ts = np.linspace(start, stop, n_total)
    r_cc = a + b * ts
    cc = np.stack([r_cc * np.cos(ts) + 5.0, r_cc * np.sin(ts)], axis=1)
    zs_cw = stop + 1.0 - ts
    r_cw = a + b * 50.0 / zs_cw
    cw = np.stack([r_cw * np.cos(zs_cw) - 5.0, r_cw * np.sin(zs_cw)], axis=1)
    return ts, cc, cw


def generate_spirals(n_series: int, seed: int, *, n_points: int = N_POINTS, window: int = 100,
                     noise: float = SPIRAL_NOISE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chen et al. 2018 §5.1 spirals: each series a random window of ``window`` dense points (start
    index in [window, 1000 − 2·window], as in their code) on a random direction's spiral, observed
    at ``n_points`` irregular times of the window (times from 0), plus N(0, noise²).

    Returns:
        t (N, n_points), y (N, n_points, 2), clockwise (N,) bool.
    """
    if not 2 <= n_points <= window:
        raise DatasetError(f"dataset.n_points must lie in [2, {window}] for spirals (points of a {window}-point "
                           f"window), got {n_points}")
    ts, cc, cw = spiral_curves()
    rng = np.random.default_rng([int(seed), 0x5B12])
    clockwise = rng.random(n_series) > 0.5
    starts = rng.integers(window, len(ts) - 2 * window, size=n_series)
    idx = _irregular_indices(rng, n_series, window, n_points) + starts[:, None]
    curves = np.where(clockwise[:, None, None], cw[idx], cc[idx])
    t = ts[idx] - ts[starts][:, None]
    return t, curves + noise * rng.standard_normal(curves.shape), clockwise


# ---- packing and validation ---------------------------------------------------------------------
def pack(series: list[tuple[np.ndarray, np.ndarray, np.ndarray]], what: str = "uploaded data set") -> SeriesSet:
    """Pad a list of series ``(t (L,), y (L, D), mask (L, D))`` and validate them.

    Raises:
        DatasetError: naming the series (and point) at fault: non-finite or non-increasing times,
            fewer than 2 points, an infinite value, too many series/points/dims, a series with fewer
            than two observed points, a dimension that differs between series.
    """
    if not MIN_SERIES <= len(series) <= MAX_SERIES:
        raise DatasetError(f"{what}: {len(series)} series; between {MIN_SERIES} and {MAX_SERIES} are accepted")
    dims = {s[1].shape[1] for s in series}
    if len(dims) != 1:
        raise DatasetError(f"{what}: series have different dimensions {sorted(dims)}")
    dim = dims.pop()
    if not 1 <= dim <= MAX_DIM:
        raise DatasetError(f"{what}: {dim} value columns; between 1 and {MAX_DIM} are accepted")
    lengths = np.array([len(s[0]) for s in series], dtype=np.int64)
    width = int(lengths.max())
    if width > MAX_POINTS_PER_SERIES or len(series) * width * dim > MAX_VALUES:
        raise DatasetError(f"{what}: too large ({len(series)} series, up to {width} points, {dim} dims); at most "
                           f"{MAX_POINTS_PER_SERIES} points per series and {MAX_VALUES} padded values")
    t = np.zeros((len(series), width))
    y = np.zeros((len(series), width, dim))
    mask = np.zeros((len(series), width, dim), dtype=bool)
    for i, (ti, yi, mi) in enumerate(series):
        length = len(ti)
        if length < 2:
            raise DatasetError(f"{what}: series {i} has {length} point(s); at least 2 are needed")
        if not np.all(np.isfinite(ti)):
            raise DatasetError(f"{what}: series {i}, point {int(np.flatnonzero(~np.isfinite(ti))[0])}: time is not finite")
        steps = np.flatnonzero(np.diff(ti) <= 0)
        if steps.size:
            j = int(steps[0]) + 1
            raise DatasetError(f"{what}: series {i}, point {j}: times must be strictly increasing within a series "
                               f"(t={ti[j]:g} after t={ti[j - 1]:g})")
        mi = mi & ~np.isnan(yi)
        bad = mi & ~np.isfinite(yi)
        if bad.any():
            j, d = np.argwhere(bad)[0]
            raise DatasetError(f"{what}: series {i}, point {j}, value {d}: infinite value")
        if int(mi.any(axis=1).sum()) < 2:
            raise DatasetError(f"{what}: series {i} has fewer than 2 observed points")
        t[i, :length], t[i, length:] = ti, ti[-1]
        y[i, :length] = np.where(mi, yi, 0.0)
        mask[i, :length] = mi
    return SeriesSet(t, y, mask, lengths)


def load_series(path: str | os.PathLike) -> SeriesSet:
    """Read and validate uploaded series from CSV (long format) or ``.npz`` (see the module doc).

    Raises:
        DatasetError: missing/oversized file, unsupported suffix, unparsable content (naming the CSV
            row or the npz array), and everything :func:`pack` refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"uploaded series: file {str(path)!r} does not exist")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise DatasetError(f"uploaded series: file exceeds the limit of {MAX_FILE_BYTES} bytes")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path)
    if suffix in (".csv", ".txt"):
        return read_csv(path.read_text(encoding="utf-8"))
    raise DatasetError(f"uploaded series: unsupported file type {suffix!r}; use .csv (long format) or .npz")


def _read_npz(path: Path) -> SeriesSet:
    try:
        with np.load(path, allow_pickle=False) as archive:  # never unpickle user files
            arrays = {k: archive[k] for k in archive.files}
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetError(f"uploaded series: cannot read {path.name} as .npz: {exc}") from None
    for key in ("t", "y"):
        if key not in arrays:
            raise DatasetError(f"uploaded series: .npz needs arrays 't' (N, T) and 'y' (N, T, D); '{key}' is missing")
    t, y = arrays["t"], arrays["y"]
    if t.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
        raise DatasetError("uploaded series: 't' and 'y' must be numeric arrays")
    if t.ndim != 2 or y.ndim != 3 or y.shape[:2] != t.shape:
        raise DatasetError(f"uploaded series: 't' must be (N, T) and 'y' (N, T, D), got {t.shape} and {y.shape}")
    mask = arrays.get("mask")
    if mask is None:
        mask = np.ones(y.shape, dtype=bool)
    elif mask.shape != y.shape or mask.dtype.kind not in "biu":
        raise DatasetError(f"uploaded series: 'mask' must be (N, T, D) of 0/1 like 'y' {y.shape}, got {mask.shape}")
    t, y, mask = t.astype(np.float64), y.astype(np.float64), mask.astype(bool)
    series = []
    for i in range(t.shape[0]):
        finite = np.isfinite(t[i])
        length = int(np.argmin(finite)) if not finite.all() else t.shape[1]  # trailing NaN times are padding
        if not np.isnan(t[i, length:]).all():
            raise DatasetError(f"uploaded series: series {i}, point {length}: time is not finite "
                               f"(only trailing NaN times may pad a shorter series)")
        series.append((t[i, :length], y[i, :length], mask[i, :length]))
    return pack(series)


def read_csv(text: str) -> SeriesSet:
    """Long-format CSV: ``series_id, t, y1, ..., yD`` (header optional); rows of a series in time order.

    Raises:
        DatasetError: naming the (1-based) CSV row and column of a bad cell, plus what :func:`pack` refuses.
    """
    rows = list(csv.reader(io.StringIO(text)))
    if rows and rows[0] and not _is_number(rows[0][1] if len(rows[0]) > 1 else ""):
        start = 1  # a header row of column names
    else:
        start = 0
    groups: dict[str, tuple[list[float], list[list[float]]]] = {}
    width = None
    for r in range(start, len(rows)):
        row = rows[r]
        if not row or all(not c.strip() for c in row):
            continue
        if width is None:
            width = len(row)
            if width < 3:
                raise DatasetError(f"uploaded series: row {r + 1}: expected series_id, t, y1, ... (3+ columns), "
                                   f"got {width}")
        if len(row) != width:
            raise DatasetError(f"uploaded series: row {r + 1} has {len(row)} columns; expected {width}")
        try:
            t = float(row[1])
        except ValueError:
            raise DatasetError(f"uploaded series: row {r + 1}, column 2 (t): {row[1]!r} is not a number") from None
        values = []
        for c in range(2, width):
            cell = row[c].strip()
            try:
                values.append(float(cell) if cell else float("nan"))  # empty cell: missing value
            except ValueError:
                raise DatasetError(f"uploaded series: row {r + 1}, column {c + 1}: {cell!r} is not a number") from None
        if not np.isfinite(t) or any(np.isinf(v) for v in values):
            raise DatasetError(f"uploaded series: row {r + 1}: time and values must be finite (empty = missing)")
        times, ys = groups.setdefault(row[0].strip(), ([], []))
        if times and t <= times[-1]:
            raise DatasetError(f"uploaded series: row {r + 1}: t={t:g} is not after t={times[-1]:g} of series "
                               f"{row[0].strip()!r}; times must be strictly increasing within a series")
        times.append(t)
        ys.append(values)
    if not groups:
        raise DatasetError("uploaded series: the CSV has no data rows")
    series = []
    for times, ys in groups.values():
        arr = np.asarray(ys, dtype=np.float64)
        series.append((np.asarray(times), arr, ~np.isnan(arr)))
    return pack(series)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def save_npz(data: SeriesSet) -> bytes:
    """The ``.npz`` bytes of ``data`` (t padded with NaN past each length), readable by :func:`load_series`."""
    t = data.t.copy()
    for i, length in enumerate(data.lengths):
        t[i, length:] = np.nan
    buf = io.BytesIO()
    np.savez(buf, t=t, y=data.y, mask=data.mask)
    return buf.getvalue()


def context_lengths(lengths: np.ndarray) -> np.ndarray:
    """Points of each series used for fitting (the rest are extrapolated): ceil(``CONTEXT_FRACTION`` ·
    length), at least 2 and at most the length. ``lengths`` (N,) int -> (N,) int64."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.minimum(np.maximum(2, np.ceil(CONTEXT_FRACTION * lengths)).astype(np.int64), lengths)


def strict_grid(t: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``t`` (N, T) with each row's padding past ``lengths[i]`` replaced by strictly increasing
    times just after its last one (steps of 1e-6 of the row's span), so every row is a valid
    per-sample output grid; padded outputs are masked out."""
    t = np.array(t, dtype=np.float64)
    for i, length in enumerate(lengths):
        pad = t.shape[1] - int(length)
        if pad:
            step = 1e-6 * max(t[i, length - 1] - t[i, 0], 1.0)
            t[i, length:] = t[i, length - 1] + step * np.arange(1, pad + 1)
    return t
