"""The learned vector field of a ``node`` model in the user's units, and its error against a known field.

A ``node`` model (``node_engine.models.node.NeuralODE``) learns dz/dt = g_θ(t, z) on standardized
values z = (y − mean) / std (times are not rescaled). In the user's units the field is, by the chain
rule (dy/dt = std ⊙ dz/dt),

    f(t, y) = std ⊙ g_θ(t, (y − mean) / std).

:func:`field_rel_rmse` compares f with a known field f* (the generators' ``TRUE_FIELDS``) on an
n × n grid over the bounding box of the observed training values, at ``n_times`` times spread over
the training series' time span (g_θ may depend on t; the built-in fields do not):

    relative RMS error = sqrt(mean |f − f*|²) / sqrt(mean |f*|²)   (means over grid points and times)

0 for the true field; a·f* gives |a − 1|. The ``timeseries`` family reports it as
``vector_field_rel_rmse`` for built-in generators; ``service/plots.py`` draws f as streamlines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

GRID = 32  #: grid points per axis of the error metric
TIMES = 5  #: times over the training span at which a time-dependent learned field is compared


def field_unavailable(model: Any) -> str | None:
    """Why the learned field of ``model`` (a ``NeuralODE`` or a served object holding one as ``.model``)
    cannot be drawn as a field of the data's dimensions, or None.

    Only plain ``node`` models have one: an augmented model's field lives in D + A dimensions (its
    y-part depends on the unobserved augmented state), and latent models' fields are in latent space.
    """
    from node_engine.models.node import NeuralODE

    inner = getattr(model, "model", model)
    if not isinstance(inner, NeuralODE):
        return "the learned vector field is drawn for model type 'node' only (latent and recurrent models have no field in the data's space)"
    if inner.augment_dim:
        return f"this 'node' model is augmented (augment_dim={inner.augment_dim}): its field lives in {inner.dim}+{inner.augment_dim} dimensions, not in the data's"
    return None


def learned_field(model: Any, standardization: Any, y: np.ndarray, t: float) -> np.ndarray:
    """f(t, y) = std ⊙ g_θ(t, (y − mean) / std) of a plain ``node`` model, in the user's units.

    Args:
        model: ``NeuralODE`` (any dtype/device; evaluated without grad).
        standardization: the data's ``Standardization`` (``mean``, ``std`` (D,)).
        y: (N, D) states in the user's units.
        t: the time (user's units) at which the (possibly time-dependent) field is evaluated.
    Returns:
        (N, D) float64, dy/dt in the user's units per unit time.
    Raises:
        ValueError: an augmented or non-``node`` model (:func:`field_unavailable`), wrong D.
    """
    reason = field_unavailable(model)
    if reason is not None:
        raise ValueError(reason)
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != model.dim:
        raise ValueError(f"y must have shape (N, {model.dim}), got {y.shape}")
    param = next(model.parameters())
    z = torch.as_tensor(standardization.forward(y), dtype=param.dtype, device=param.device)
    with torch.no_grad():
        g = model.field(torch.tensor(float(t), dtype=param.dtype, device=param.device), z)
    return g.double().cpu().numpy() * standardization.std


def observed_box(part: Any, standardization: Any) -> tuple[np.ndarray, np.ndarray]:
    """(lo (D,), hi (D,)) of the observed values of a ``SeriesSet`` (standardized), in the user's units."""
    y = standardization.inverse(part.y)
    lo = np.array([y[..., d][part.mask[..., d]].min() for d in range(part.dim)])
    hi = np.array([y[..., d][part.mask[..., d]].max() for d in range(part.dim)])
    return lo, hi


def time_span(part: Any) -> tuple[float, float]:
    """(earliest, latest) time of a ``SeriesSet`` (each series up to its length)."""
    last = part.t[np.arange(part.n), part.lengths - 1]
    return float(part.t[:, 0].min()), float(last.max())


def grid_2d(lo: np.ndarray, hi: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An n × n grid over the box [lo, hi] (2-D): (xs (n,), ys (n,), points (n·n, 2), row-major in y)."""
    xs, ys = np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n)
    gx, gy = np.meshgrid(xs, ys)
    return xs, ys, np.stack([gx.ravel(), gy.ravel()], axis=1)


def rel_rmse(learned: Callable[[float, np.ndarray], np.ndarray], true: Callable[[float, np.ndarray], np.ndarray],
             lo: np.ndarray, hi: np.ndarray, times: np.ndarray, n: int = GRID, keep: np.ndarray | None = None) -> float:
    """sqrt(mean |f − f*|²) / sqrt(mean |f*|²) over an n × n grid on [lo, hi] and the given ``times``.

    Args:
        learned: f(t, y (N, 2)) -> (N, 2).
        true: f*(t, y (2, ...)) -> (2, ...) (the signature of ``timeseries.TRUE_FIELDS``).
        lo, hi: (2,) box corners; times: (K,).
        keep: optional (n·n,) bool, the grid points (:func:`grid_2d` order) the means run over.
    """
    _, _, points = grid_2d(lo, hi, n)
    if keep is not None:
        points = points[np.asarray(keep, dtype=bool)]
    sq_err, sq_true = 0.0, 0.0
    for t in np.asarray(times, dtype=np.float64):
        f_true = np.asarray(true(float(t), points.T), dtype=np.float64).T
        sq_err += float(((learned(float(t), points) - f_true) ** 2).sum())
        sq_true += float((f_true ** 2).sum())
    return float(np.sqrt(sq_err / sq_true))


def near_observations(part: Any, standardization: Any, lo: np.ndarray, hi: np.ndarray, n: int,
                      radius: float) -> np.ndarray:
    """(n·n,) bool: the :func:`grid_2d` points on [lo, hi] within ``radius`` of an observed point of a
    ``SeriesSet``, distances measured with each axis scaled to the box's side (radius 0.05 = 5% of it)."""
    _, _, points = grid_2d(lo, hi, n)
    y = standardization.inverse(part.y)[part.mask.all(axis=2)]  # fully observed points, user's units
    scale = np.where(hi > lo, hi - lo, 1.0)
    d2 = ((((points[:, None, :] - y[None, :, :]) / scale) ** 2).sum(axis=2)).min(axis=1)
    return d2 <= radius ** 2


def field_rel_rmse(model: Any, data: Any, n: int = GRID, n_times: int = TIMES,
                   near: float | None = None) -> float | None:
    """Relative RMS error of a ``node`` model's learned field against the true one of ``data``'s
    generator (the module's definition), or None when it has none: not a built-in generator with
    known dynamics, not 2-D, or a model without a field in the data's space (augmented).

    Args:
        model: ``NeuralODE`` trained on ``data`` (a ``TimeSeriesData``).
        near: if given, only grid points within this distance (a fraction of the box's sides) of an
            observed training point count (:func:`near_observations`): the error where data was seen.
    """
    from node_engine.datasets.timeseries import TRUE_FIELDS

    true = TRUE_FIELDS.get(data.name)
    if true is None or data.dim != 2 or field_unavailable(model) is not None:
        return None
    lo, hi = observed_box(data.train, data.standardization)
    start, end = time_span(data.train)
    times = np.linspace(start, end, n_times)
    keep = None if near is None else near_observations(data.train, data.standardization, lo, hi, n, near)
    return rel_rmse(lambda t, y: learned_field(model, data.standardization, y, t), true, lo, hi, times, n, keep)
