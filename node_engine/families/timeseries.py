"""Time series (family ``timeseries``, the data-set kind): model types ``node`` (Neural ODE dynamics
fitted to the series, Chen et al. 2018), ``latent_ode`` (ODE-RNN encoder, latent ODE, decoder;
Rubanova et al. 2019) and ``rnn`` (GRU with Δt input, the baseline of Chen et al. 2018 §5.1).

Every model reads the same padded batch (``node_engine.models.series``) and has ``loss`` and
``predict``; this family only arranges the data. Training: the model's ``loss`` on a batch of
training series (``node``: MSE from the first point; ``latent_ode``: negative ELBO; ``rnn``:
one-step MSE). Evaluation: each test series' first ``context`` points are given
(``data.context``, 75%) and the model predicts every later time of the series; reported in the
user's units: ``test_interp_mse`` (observed entries at points 1..context−1) and
``test_extrap_mse`` (the points after the context), plus ``nfe_forward``. Serves ``forecast``
(:class:`Forecaster`); plots ``trajectories``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from node_engine.datasets.timeseries import strict_grid
from node_engine.families.base import Family
from node_engine.families.vector_field import field_rel_rmse


def _series_tensors(part, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    """(t grid (N, T), y (N, T, D), mask (N, T, D) float, lengths (N,) int64) of a ``SeriesSet``,
    padding made strictly increasing (``node_engine.models.series`` layout)."""
    return (torch.as_tensor(strict_grid(part.t, part.lengths), dtype=dtype), torch.as_tensor(part.y, dtype=dtype),
            torch.as_tensor(part.mask, dtype=dtype), torch.as_tensor(part.lengths, dtype=torch.int64))


class TimeSeriesFamily(Family):
    name: ClassVar[str] = "timeseries"
    model_input: ClassVar[str] = "series"
    default_batch_size: ClassVar[int] = 16
    serves: ClassVar[tuple[str, ...]] = ("forecast",)
    plots: ClassVar[tuple[str, ...]] = ("trajectories", "vector_field")
    train_metrics: ClassVar[tuple[str, ...]] = ()
    eval_metrics: ClassVar[tuple[str, ...]] = ("test_interp_mse", "test_extrap_mse", "vector_field_rel_rmse")

    def data_info(self, data) -> dict[str, Any]:
        unobserved_start = None  # the first series whose first point is not fully observed (node needs one)
        for part, which in ((data.train, "train"), (data.test, "test")):
            unobserved = np.flatnonzero(~part.mask[:, 0].all(axis=1))
            if unobserved.size and unobserved_start is None:
                unobserved_start = f"{which} series {int(unobserved[0])}"
        return {"dim": data.dim, "n_train": data.train.n, "n_test": data.test.n,
                "unobserved_start": unobserved_start}

    def build_model(self, spec, info):
        model = super().build_model(spec, info)
        if model.needs_observed_start and info.get("unobserved_start"):
            from node_engine.errors import DatasetError

            raise DatasetError(f"{info['unobserved_start']} lacks values at its first time; model "
                               f"{spec['model']['type']!r} starts every series from a fully observed first point "
                               f"('latent_ode' and 'rnn' read any observed entries)")
        return model

    def train_tensors(self, data):
        return _series_tensors(data.train)

    def loss(self, model, data, batch, size, generator):
        return model.loss(*batch, generator)

    def evaluate(self, model, data, *, batch_size, device, generator):
        t, y, mask, lengths = (x.to(device) for x in _series_tensors(data.test))
        std = torch.as_tensor(data.standardization.std, dtype=y.dtype, device=device)
        context = torch.as_tensor(data.context, device=device)
        index = torch.arange(1, t.shape[1], device=device)[None, :, None]  # the predicted points 1..T-1
        interp = mask[:, 1:] * (index < context[:, None, None])
        extrap = mask[:, 1:] * (index >= context[:, None, None])
        sums = torch.zeros(4, dtype=torch.float64)
        nfe, solves = 0, 0
        for start in range(0, len(t), batch_size):
            rows = slice(start, start + batch_size)
            model.stats.reset()
            pred = model.predict(t[rows], y[rows], mask[rows], context[rows], t[rows, 1:])  # given the context only
            err = ((pred - y[rows, 1:]) * std) ** 2  # user's units
            nfe, solves = nfe + model.stats.nfe_forward, solves + 1
            sums += torch.stack([(err * interp[rows]).sum(), interp[rows].sum(),
                                 (err * extrap[rows]).sum(), extrap[rows].sum()]).double().cpu()
        return {"test_interp_mse": float(sums[0] / sums[1].clamp_min(1.0)),
                "test_extrap_mse": float(sums[2] / sums[3]) if sums[3] > 0 else None,
                "vector_field_rel_rmse": field_rel_rmse(model, data),  # null without a known field (vector_field.py)
                "nfe_forward": nfe / solves}

    def served(self, model, info, *, spec, step, metrics, device):
        from node_engine.datasets import Standardization

        return Forecaster(model, Standardization.from_json(info["standardization"]), spec=spec, step=step,
                          metrics=metrics, device=device)


class Forecaster:
    """A trained time-series model (``node``, ``latent_ode``, ``rnn``) in the user's units. Serves ``forecast``.

    What a series' observations give: ``node`` integrates from the first observation (which must be
    fully observed; the later ones are not read); ``latent_ode`` encodes all of them (q(z0 | y)) and
    answers the decoded trajectory of the posterior mean z0 = μ (not the mean over draws), plus
    posterior draws on request; ``rnn`` runs its GRU over all of them and predicts autoregressively
    past the last one (``node_engine.models.rnn``).

    Attributes: ``dim`` D, ``model`` (eval mode, float64 by ``load_model``), ``standardization``,
    ``spec``, ``step``, ``metrics``, ``samples`` (True: posterior draws), ``needs_observed_start``.
    """

    serves = ("forecast",)

    def __init__(self, model, standardization, *, spec, step, metrics, device):
        self.model = model.eval()
        self.standardization = standardization
        self.dim = int(standardization.mean.size)
        self.spec, self.step, self.metrics, self.device = spec, step, metrics, device
        self.samples = hasattr(model, "draw")  #: latent models have posterior draws; node and rnn are deterministic
        self.needs_observed_start = bool(model.needs_observed_start)
        self._dtype = next(model.parameters()).dtype

    def forecast(self, starts: list[tuple[float, np.ndarray]], t: np.ndarray) -> tuple[list[np.ndarray], int]:
        """y at times ``t`` of series given by one observation each: ``starts`` per series (t0, y0 (D,))
        in the user's units. Same as :meth:`forecast_series` with one-point series; returns (means, NFE)."""
        series = [(np.array([float(t0)]), np.asarray(y0, dtype=np.float64)[None], None) for t0, y0 in starts]
        means, _, nfe = self.forecast_series(series, t)
        return means, nfe

    def forecast_series(self, series: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], t: np.ndarray, *,
                        samples: int = 0, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray] | None, int]:
        """Each series' trajectory at times ``t`` from its observations, in the user's units.

        Args:
            series: per series (t_obs (L,) strictly increasing, y (L, D) with NaN = missing, mask (L, D)
                bool or None (None: the non-NaN entries)), user's units.
            t: (T,) strictly increasing times wanted, none before any series' first observation.
            samples: k posterior draws per series (latent models only).
            seed: draw j of a series is keyed by (seed, j, the series' own t/y/mask bytes)
                (``node_engine.models.keyed_noise``), so it does not depend on the other series.
        Returns:
            (per series the mean (T, D) float64; per series the draws (k, T, D) float64, or None when
            ``samples`` is 0; total NFE). A series' answers are the same alone or with any others
            (per-sample solves, row-wise networks, float64).
        Raises:
            ValueError: ``series[i]``: times not increasing, wrong dimension, an unobserved first point
                (``node``), no observed value; ``t`` before a series' start; ``samples`` for a
                deterministic model. SolverError subclasses.
        """
        from node_engine.models.keyed_noise import keyed_normal_array, point_keys

        t = np.asarray(t, dtype=np.float64)
        if samples and not self.samples:
            raise ValueError("samples: this model is deterministic and has no posterior draws")
        if t.ndim != 1 or not len(t) or np.any(np.diff(t) <= 0):
            raise ValueError("t must be a non-empty strictly increasing (T,) array")
        rows = []
        for i, (ts, ys, ms) in enumerate(series):
            ts, ys = np.asarray(ts, dtype=np.float64).reshape(-1), np.asarray(ys, dtype=np.float64)
            if ys.shape != (len(ts), self.dim):
                raise ValueError(f"series {i}: y must be ({len(ts)}, {self.dim}), got {ys.shape}")
            ms = ~np.isnan(ys) if ms is None else (np.asarray(ms, dtype=bool) & ~np.isnan(ys))
            if np.any(np.diff(ts) <= 0):
                raise ValueError(f"series {i}: observation times must be strictly increasing")
            if t[0] < ts[0]:
                raise ValueError(f"series {i}: t={t[0]:g} is before its first observation t={ts[0]:g}")
            if self.needs_observed_start and not ms[0].all():
                raise ValueError(f"series {i}: the first observation must be fully observed (the model starts there)")
            if not ms.any():
                raise ValueError(f"series {i}: no observed value")
            rows.append((ts, np.where(ms, self.standardization.forward(np.where(ms, ys, 0.0)), 0.0), ms))
        width = max(len(r[0]) for r in rows)
        lengths = np.array([len(r[0]) for r in rows], dtype=np.int64)
        tt, yy = np.zeros((len(rows), width)), np.zeros((len(rows), width, self.dim))
        mm = np.zeros_like(yy)
        for i, (ts, ys, ms) in enumerate(rows):
            tt[i, :len(ts)], tt[i, len(ts):], yy[i, :len(ts)], mm[i, :len(ts)] = ts, ts[-1], ys, ms
        as_t = lambda a: torch.as_tensor(a, dtype=self._dtype, device=self.device)  # noqa: E731
        obs = (as_t(strict_grid(tt, lengths)), as_t(yy), as_t(mm), torch.as_tensor(lengths, device=self.device))
        t_out = as_t(np.broadcast_to(t, (len(rows), len(t))).copy())
        self.model.stats.reset()
        with torch.no_grad():
            if samples:
                keys = np.concatenate([point_keys(torch.as_tensor(np.concatenate([ts, ys.ravel(), ms.ravel()]))[None],
                                                  seed=int(seed)) for ts, ys, ms in rows])
                eps = np.stack([keyed_normal_array(keys, j, self.model.latent_dim) for j in range(int(samples))])
                mean, draws = self.model.draw(*obs, t_out, as_t(eps))
                draws = draws.double().cpu().numpy()
            else:
                mean, draws = self.model.predict(*obs, t_out), None
        mean = mean.double().cpu().numpy()
        means = [self.standardization.inverse(m) for m in mean]
        drawn = None if draws is None else [self.standardization.inverse(draws[:, i]) for i in range(len(rows))]
        return means, drawn, int(self.model.stats.nfe_forward)
