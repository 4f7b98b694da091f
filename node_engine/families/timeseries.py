"""Time series (family ``timeseries``, the data-set kind): model type ``node``, Neural ODE dynamics fitted
to the series (Chen et al. 2018).

Each series is integrated from its first observation on its own times (``odeint`` per sample with
``t`` (B, T)); the loss is the MSE over the later observed entries, in standardized units.
Evaluation integrates each test series from its first point over all its times and reports, in the
user's units, ``test_interp_mse`` (observed entries within its first ``context`` points) and
``test_extrap_mse`` (the points after them). Serves ``forecast``; plots ``trajectories``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from node_engine.datasets.timeseries import strict_grid
from node_engine.families.base import Family


def _series_tensors(part, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    """(t grid (N, T), y (N, T, D), mask (N, T, D) float) of a ``SeriesSet``, padding made strictly increasing."""
    return (torch.as_tensor(strict_grid(part.t, part.lengths), dtype=dtype), torch.as_tensor(part.y, dtype=dtype),
            torch.as_tensor(part.mask, dtype=dtype))


class TimeSeriesFamily(Family):
    name: ClassVar[str] = "timeseries"
    model_input: ClassVar[str] = "series"
    default_batch_size: ClassVar[int] = 16
    serves: ClassVar[tuple[str, ...]] = ("forecast",)
    plots: ClassVar[tuple[str, ...]] = ("trajectories", "vector_field")
    train_metrics: ClassVar[tuple[str, ...]] = ()
    eval_metrics: ClassVar[tuple[str, ...]] = ("test_interp_mse", "test_extrap_mse")

    def data_info(self, data) -> dict[str, Any]:
        for part, which in ((data.train, "train"), (data.test, "test")):
            unobserved = np.flatnonzero(~part.mask[:, 0].all(axis=1))
            if unobserved.size:
                from node_engine.errors import DatasetError

                raise DatasetError(f"{data.name}: {which} series {int(unobserved[0])} lacks values at its first time; "
                                   f"model 'node' starts every series from a fully observed first point")
        return {"dim": data.dim, "n_train": data.train.n, "n_test": data.test.n}

    def train_tensors(self, data):
        return _series_tensors(data.train)

    def loss(self, model, data, batch, size, generator):
        t, y, mask = batch
        pred = model(t, y[:, 0])
        mask = mask.clone()
        mask[:, 0] = 0.0  # the start point is given, not predicted
        loss = (((pred - y) ** 2) * mask).sum() / mask.sum().clamp_min(1.0)
        return loss, {}

    def evaluate(self, model, data, *, batch_size, device, generator):
        t, y, mask = (x.to(device) for x in _series_tensors(data.test))
        std = torch.as_tensor(data.standardization.std, dtype=y.dtype, device=device)
        index = torch.arange(t.shape[1], device=device)[None, :, None]
        context = torch.as_tensor(data.context, device=device)[:, None, None]
        interp = mask * ((index >= 1) & (index < context))
        extrap = mask * (index >= context)
        sums = torch.zeros(4, dtype=torch.float64)
        nfe, solves = 0, 0
        for start in range(0, len(t), batch_size):
            rows = slice(start, start + batch_size)
            model.stats.reset()
            err = ((model(t[rows], y[rows, 0]) - y[rows]) * std) ** 2  # user's units
            nfe, solves = nfe + model.stats.nfe_forward, solves + 1
            sums += torch.stack([(err * interp[rows]).sum(), interp[rows].sum(),
                                 (err * extrap[rows]).sum(), extrap[rows].sum()]).double().cpu()
        return {"test_interp_mse": float(sums[0] / sums[1].clamp_min(1.0)),
                "test_extrap_mse": float(sums[2] / sums[3]) if sums[3] > 0 else None,
                "nfe_forward": nfe / solves}

    def served(self, model, info, *, spec, step, metrics, device):
        from node_engine.datasets import Standardization

        return Forecaster(model, Standardization.from_json(info["standardization"]), spec=spec, step=step,
                          metrics=metrics, device=device)


class Forecaster:
    """A trained ``node`` model in the user's units. Serves ``forecast``.

    Attributes: ``dim`` D, ``model`` (eval mode, float64 by ``load_model``), ``standardization``,
    ``spec``, ``step``, ``metrics``.
    """

    serves = ("forecast",)
    samples = False  #: deterministic: no posterior draws (those are latent models')

    def __init__(self, model, standardization, *, spec, step, metrics, device):
        self.model = model.eval()
        self.standardization = standardization
        self.dim = int(standardization.mean.size)
        self.spec, self.step, self.metrics, self.device = spec, step, metrics, device
        self._dtype = next(model.parameters()).dtype

    def forecast(self, starts: list[tuple[float, np.ndarray]], t: np.ndarray) -> tuple[list[np.ndarray], int]:
        """y at times ``t`` of each series, integrated from its first observation.

        Args:
            starts: per series (t0, y0 (D,)), the first observation in the user's units, fully observed.
            t: (T,) strictly increasing times wanted, every one >= each series' t0.
        Returns:
            (per series an (T, D) float64 array in the user's units, total NFE). A series' answer is
            the same alone or with any other series (per-sample stepping, its own grid).
        Raises:
            ValueError: times before a series' start, wrong dimension. SolverError subclasses.
        """
        t = np.asarray(t, dtype=np.float64)
        grids, y0 = [], []
        for i, (t0, y) in enumerate(starts):
            if t[0] < t0:
                raise ValueError(f"series {i}: t={t[0]:g} is before its first observation t={t0:g}")
            later = t[t > t0]
            # the row's own grid: its start, the times after it and, when t[0] == t0 (its start is
            # asked for), one point past the end so the grid keeps T + 1 entries; depends on no other row
            tail = [] if len(later) == len(t) else [t[-1] + 1e-6 * max(t[-1] - t0, 1.0)]
            grids.append(np.concatenate([[t0], later, tail]))
            y0.append(self.standardization.forward(np.asarray(y, dtype=np.float64)[None])[0])
        tt = torch.as_tensor(np.stack(grids), dtype=self._dtype, device=self.device)
        z0 = torch.as_tensor(np.stack(y0), dtype=self._dtype, device=self.device)
        self.model.stats.reset()
        with torch.no_grad():
            out = self.model(tt, z0).double().cpu().numpy()  # (B, T + 1, D)
        results = []
        for i, (t0, _) in enumerate(starts):
            rows = out[i, :len(t)] if t[0] == t0 else out[i, 1:]
            results.append(self.standardization.inverse(rows))
        return results, int(self.model.stats.nfe_forward)
