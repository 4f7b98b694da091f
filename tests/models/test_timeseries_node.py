"""The ``node`` model on time series: it learns (loss falls, the learned field moves towards the true
Lotka–Volterra field), evaluation reports interpolation/extrapolation MSE and NFE, and served
forecasts are in the user's units, match an independent scipy solve of the learned field, and do
not depend on the other series of a request."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from node_engine.datasets import timeseries
from node_engine.inference import load_model
from node_engine.training import TrainingCallbacks, build_trainer

SPEC = {"model": {"type": "node", "hidden_dims": [16]}, "dataset": {"name": "lotka_volterra", "n_samples": 12, "seed": 1},
        "solver": {"rtol": 1e-2, "atol": 1e-3, "eval_rtol": 1e-8, "eval_atol": 1e-9, "adjoint": False},
        "training": {"iterations": 60, "batch_size": 4, "lr": 1e-2, "eval_every": 60}}


def _field_error(trainer, t: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error of the learned dy/dt (user's units) against the true field at states (t, y)."""
    st = trainer.data.standardization
    with torch.no_grad():
        z = torch.as_tensor(st.forward(y), dtype=torch.float32)
        learned = trainer.model.field(torch.as_tensor(t, dtype=torch.float32), z).numpy() * st.std
    return float(np.mean((learned - timeseries.lotka_volterra_field(0.0, y.T).T) ** 2))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    trainer = build_trainer(SPEC)
    t, y = timeseries.generate_ode("lotka_volterra", 8, seed=9, noise=0.0)  # states the series visit
    states = (t.reshape(-1), y.reshape(-1, 2))
    before = _field_error(trainer, *states)
    losses, evals = [], []

    class Record(TrainingCallbacks):
        def on_step(self, record):
            losses.append(record)

        def on_eval(self, metrics):
            evals.append(metrics)

    trainer.run(Record())
    return trainer, losses, evals, before, _field_error(trainer, *states)


def test_node_learns_lotka_volterra(trained):
    trainer, losses, evals, before, after = trained
    loss = [r["loss"] for r in losses]
    assert np.mean(loss[-10:]) < 0.2 * np.mean(loss[:3])
    assert after < 0.85 * before, (before, after)
    assert all(r["nfe_forward"] > 0 for r in losses)
    final = evals[-1]
    assert final["test_interp_mse"] > 0 and final["test_extrap_mse"] > 0 and final["nfe_forward"] > 0


def test_forecast_is_in_user_units_and_matches_a_scipy_solve_of_the_learned_field(trained):
    trainer = trained[0]
    served = load_model(trainer.checkpoint())
    assert served.serves == ("forecast",) and served.dim == 2
    st = served.standardization
    t0, y0 = 0.3, np.array([1.2, 0.7])
    times = np.array([0.3, 0.9, 2.5, 4.0])
    (mean,), nfe = served.forecast([(t0, y0)], times)
    assert nfe > 0
    np.testing.assert_allclose(mean[0], y0, rtol=1e-12)  # asked at its start: the observation itself

    def rhs(s, y):  # the learned field in the user's units, float64, outside the engine's solver
        with torch.no_grad():
            z = torch.as_tensor((y - st.mean) / st.std)[None]
            return served.model.field(torch.tensor([s], dtype=torch.float64), z)[0].numpy() * st.std

    ref = solve_ivp(rhs, (t0, times[-1]), y0, method="DOP853", t_eval=times, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mean, ref.y.T, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="before its first observation"):
        served.forecast([(1.0, y0)], times)


def test_a_series_forecast_does_not_depend_on_the_others(trained):
    served = load_model(trained[0].checkpoint())
    probe = (0.0, np.array([0.8, 1.1]))
    times = np.array([0.5, 1.0, 3.0, 7.5])
    (alone,), _ = served.forecast([probe], times)
    rng = np.random.default_rng(0)
    others = [(float(s), rng.uniform(0.3, 2.5, size=2)) for s in (0.0, 0.25, 0.5, 0.1)]
    for batch, at in (([probe, *others], 0), ([*others[:2], probe, *others[2:]], 2)):
        means, _ = served.forecast(batch, times)
        np.testing.assert_allclose(means[at], alone, rtol=1e-12, atol=0)
