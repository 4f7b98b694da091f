"""The learned vector field of a ``node`` model in the user's units and its error against a known
field: the field equals a by-hand numpy evaluation of the MLP with the standardization undone, its
scipy integral equals the served forecast, and the relative RMS error is 0 / |a − 1| / 2 sin(θ/2)
for the true field, a scaled one and a rotated one (analytic), 1 for a zero field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from node_engine.datasets import Standardization, load_dataset, split_indices, timeseries
from node_engine.families import vector_field as vf
from node_engine.families.timeseries import Forecaster
from node_engine.models.node import NeuralODE

MEAN, STD = np.array([1.2, -0.4]), np.array([0.5, 2.0])


def _node(hidden=(5,), augment_dim=0, seed=0, **solver) -> NeuralODE:
    torch.manual_seed(seed)
    model = NeuralODE.from_spec({"type": "node", "hidden_dims": list(hidden), "augment_dim": augment_dim},
                                {"method": "dopri5", **solver}, dim=2)
    return model.double()


def _numpy_field(model: NeuralODE, y: np.ndarray, t: float) -> np.ndarray:
    """std * (W2 tanh(W1 [z, t] + b1) + b2), z = (y - mean) / std, written out in numpy."""
    (w1, b1), (w2, b2) = [(m.weight.detach().numpy(), m.bias.detach().numpy())
                          for m in model.field.net if isinstance(m, torch.nn.Linear)]
    z = (y - MEAN) / STD
    zt = np.concatenate([z, np.full((len(z), 1), t)], axis=1)
    return STD * (np.tanh(zt @ w1.T + b1) @ w2.T + b2)


def test_learned_field_is_the_mlp_with_the_standardization_undone():
    model = _node()
    y = np.random.default_rng(0).normal(size=(7, 2)) * 3
    got = vf.learned_field(model, Standardization(MEAN, STD), y, 0.7)
    np.testing.assert_allclose(got, _numpy_field(model, y, 0.7), rtol=1e-12, atol=1e-12)
    assert not np.allclose(got, _numpy_field(model, y, -2.0))  # the time argument reaches the field
    xs, ys, points = vf.grid_2d(np.array([0.0, -1.0]), np.array([2.0, 3.0]), 4)  # what the plot draws on
    assert points.shape == (16, 2) and np.allclose(points[1], [xs[1], ys[0]]) and np.allclose(points[4], [xs[0], ys[1]])


def test_learned_field_integrates_to_the_served_forecast():
    """dy/dt = f(t, y) in the user's units, solved by scipy, gives what the forecaster answers."""
    model = _node(hidden=(8,), rtol=1e-10, atol=1e-10)
    st = Standardization(MEAN, STD)
    served = Forecaster(model, st, spec={}, step=0, metrics={}, device=torch.device("cpu"))
    y0, times = np.array([1.5, 0.3]), np.array([0.0, 0.4, 1.1, 2.0])
    (answer,), _ = served.forecast([(0.0, y0)], times)
    ref = solve_ivp(lambda t, y: vf.learned_field(model, st, y[None], t)[0], (0.0, 2.0), y0, method="DOP853",
                    t_eval=times, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(answer, ref.y.T, rtol=1e-7, atol=1e-8)


def test_augmented_and_non_node_models_have_no_field():
    assert "augment" in vf.field_unavailable(_node(augment_dim=1))
    assert "'node' only" in vf.field_unavailable(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="augment"):
        vf.learned_field(_node(augment_dim=1), Standardization(MEAN, STD), np.zeros((1, 2)), 0.0)
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        vf.learned_field(_node(), Standardization(MEAN, STD), np.zeros((1, 3)), 0.0)


def _rotate(field, angle):
    c, s = np.cos(angle), np.sin(angle)
    return lambda t, y: field(t, y.T).T @ np.array([[c, s], [-s, c]])


@pytest.mark.parametrize("name", sorted(timeseries.TRUE_FIELDS))
def test_relative_rms_error_of_fields_with_a_known_error(name):
    true = timeseries.TRUE_FIELDS[name]
    lo, hi, times = np.array([0.2, 0.1]), np.array([2.5, 1.9]), np.linspace(0, 10, 3)
    assert vf.rel_rmse(lambda t, y: true(t, y.T).T, true, lo, hi, times) == 0.0
    for a in (0.0, 0.5, 3.0):  # |a f* - f*| / |f*| = |a - 1| at every point
        assert vf.rel_rmse(lambda t, y: a * true(t, y.T).T, true, lo, hi, times) == pytest.approx(abs(a - 1), rel=1e-12)
    for angle in (0.3, np.pi / 2):  # |R f* - f*| = 2 sin(angle / 2) |f*|
        got = vf.rel_rmse(_rotate(true, angle), true, lo, hi, times, n=9)
        assert got == pytest.approx(2 * np.sin(angle / 2), rel=1e-12)


def test_field_error_of_a_job_uses_the_observed_training_box_and_the_true_field():
    spec = {"name": "lotka_volterra", "n_samples": 10, "seed": 4, "test_fraction": 0.2}
    data = load_dataset(spec)
    t, y = timeseries.generate_ode("lotka_volterra", 10, seed=4)  # the raw series, apart from the loader
    train, _ = split_indices(10, 0.2, 4)
    lo, hi = vf.observed_box(data.train, data.standardization)
    np.testing.assert_allclose(lo, y[train].reshape(-1, 2).min(0), rtol=1e-12)
    np.testing.assert_allclose(hi, y[train].reshape(-1, 2).max(0), rtol=1e-12)
    assert vf.time_span(data.train) == (0.0, pytest.approx(t[train, -1].max()))
    model = _node()
    with torch.no_grad():  # a zero field: the error is |f*| / |f*| = 1
        model.field.net[-1].weight.zero_()
        model.field.net[-1].bias.zero_()
    assert vf.field_rel_rmse(model, data) == pytest.approx(1.0, rel=1e-12)
    assert vf.field_rel_rmse(_node(augment_dim=1), data) is None
    assert vf.field_rel_rmse(model, load_dataset({**spec, "name": "spirals"})) is None  # no known field


def test_error_near_the_observations_counts_only_grid_points_close_to_data():
    part = timeseries.SeriesSet(t=np.array([[0.0, 1.0]]), y=np.array([[[0.0, 0.0], [2.0, 4.0]]]),
                                mask=np.ones((1, 2, 2), dtype=bool), lengths=np.array([2]))
    st = Standardization(np.zeros(2), np.ones(2))
    lo, hi = vf.observed_box(part, st)
    keep = vf.near_observations(part, st, lo, hi, 3, radius=0.1)  # grid {0, 1, 2} x {0, 2, 4}
    assert keep.tolist() == [True, False, False, False, False, False, False, False, True]
    assert vf.near_observations(part, st, lo, hi, 3, radius=0.5).sum() == 6  # plus the 4 at distance 0.5
    true = timeseries.TRUE_FIELDS["lotka_volterra"]
    _, _, points = vf.grid_2d(lo, hi, 3)
    kept = {tuple(p) for p in points[keep]}
    wrong_elsewhere = lambda t, y: np.array([true(t, p) if tuple(p) in kept else 0 * p for p in y])  # noqa: E731
    assert vf.rel_rmse(wrong_elsewhere, true, lo, hi, np.zeros(1), n=3, keep=keep) == 0.0
    assert vf.rel_rmse(wrong_elsewhere, true, lo, hi, np.zeros(1), n=3) > 0.5


@pytest.mark.parametrize("name, known", [("lotka_volterra", True), ("spirals", False)])
def test_evaluation_reports_the_field_error_for_generators_with_known_dynamics(name, known):
    from node_engine.training import build_trainer

    trainer = build_trainer({"model": {"type": "node", "hidden_dims": [4]},
                             "dataset": {"name": name, "n_samples": 10, "n_points": 6},
                             "solver": {"rtol": 1e-2, "atol": 1e-3, "adjoint": False},
                             "training": {"iterations": 1, "batch_size": 8}})
    result = trainer.run()
    if known:
        assert result["vector_field_rel_rmse"] == pytest.approx(vf.field_rel_rmse(trainer.model, trainer.data))
        assert 0.0 < result["vector_field_rel_rmse"] < 10.0
    else:
        assert result["vector_field_rel_rmse"] is None
