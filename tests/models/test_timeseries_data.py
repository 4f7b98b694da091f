"""Time-series data sets: generators against their known dynamics (scipy, closed forms), uploads
(long CSV, .npz) refused with the series/row at fault named, the split by series and the
standardization."""

from __future__ import annotations

import io

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from node_engine.datasets import TimeSeriesData, load_dataset, timeseries
from node_engine.errors import DatasetError


# the documented systems, written out independently of the generator's code
ODES = {
    "lotka_volterra": lambda s, v: [2 / 3 * v[0] - 4 / 3 * v[0] * v[1], v[0] * v[1] - v[1]],
    "van_der_pol": lambda s, v: [v[1], (1 - v[0] ** 2) * v[1] - v[0]],
}


@pytest.mark.parametrize("name", sorted(ODES))
def test_generated_series_follow_their_ode(name):
    t, y = timeseries.generate_ode(name, 4, seed=3, noise=0.0)
    field = ODES[name]
    np.testing.assert_allclose(timeseries.TRUE_FIELDS[name](0.0, y[0].T).T, np.array([field(0, v) for v in y[0]]))
    for i in range(len(t)):  # each series from its own first point, per series, apart from the batched generation
        ref = solve_ivp(lambda s, v: field(s, v), (t[i, 0], t[i, -1]), y[i, 0], method="DOP853", t_eval=t[i],
                        rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ref.y.T, y[i], atol=1e-6)


def test_damped_oscillator_matches_the_closed_form():
    t, y = timeseries.generate_ode("damped_oscillator", 3, seed=0, noise=0.0)
    w, z = timeseries.OSC_OMEGA, timeseries.OSC_ZETA
    wd = w * np.sqrt(1 - z ** 2)
    for i in range(3):
        x0, v0 = y[i, 0]
        s = t[i] - t[i, 0]
        a, b = x0, (v0 + z * w * x0) / wd
        x = np.exp(-z * w * s) * (a * np.cos(wd * s) + b * np.sin(wd * s))
        np.testing.assert_allclose(y[i, :, 0], x, atol=1e-8)


def test_spirals_lie_on_the_papers_curves_in_both_directions():
    t, y, clockwise = timeseries.generate_spirals(200, seed=0, noise=0.0)
    assert 0 < clockwise.sum() < 200
    for i in np.flatnonzero(clockwise)[:5]:  # r = 50 b / θ about (−5, 0)
        p = y[i] - [-5.0, 0.0]
        r = np.hypot(*p.T)
        theta = 50 * 0.3 / r
        np.testing.assert_allclose(p, np.stack([r * np.cos(theta), r * np.sin(theta)], 1), atol=1e-9)
    for i in np.flatnonzero(~clockwise)[:5]:  # r = b θ about (5, 0)
        p = y[i] - [5.0, 0.0]
        r = np.hypot(*p.T)
        theta = r / 0.3
        np.testing.assert_allclose(p, np.stack([r * np.cos(theta), r * np.sin(theta)], 1), atol=1e-9)
    noisy = timeseries.generate_spirals(200, seed=0)[1]
    assert abs(np.std(noisy - y) - timeseries.SPIRAL_NOISE) < 0.01


def test_each_series_has_its_own_irregular_times_and_the_split_is_by_series():
    data = load_dataset({"name": "lotka_volterra", "n_samples": 20, "test_fraction": 0.25, "seed": 4})
    assert isinstance(data, TimeSeriesData) and data.train.n == 15 and data.test.n == 5
    t = data.train.t
    assert np.all(np.diff(t, axis=1) > 0)
    assert len({tuple(row) for row in np.diff(t, axis=1).round(9)}) == len(t)  # no shared grid
    assert not np.allclose(np.diff(t[0]), np.diff(t[0])[0])  # irregular
    observed = data.train.y[data.train.mask].reshape(-1, 2)
    np.testing.assert_allclose(observed.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(observed.std(0), 1, atol=1e-9)
    again = load_dataset({"name": "lotka_volterra", "n_samples": 20, "test_fraction": 0.25, "seed": 4})
    np.testing.assert_array_equal(again.test.y, data.test.y)
    with pytest.raises(DatasetError, match="number of series"):
        load_dataset({"name": "spirals", "n_samples": 10**6})


@pytest.mark.parametrize("name, n_points", [("spirals", 50), ("spirals", 100), ("van_der_pol", 12)])
def test_n_points_sets_the_observations_per_generated_series(name, n_points):
    data = load_dataset({"name": name, "n_samples": 10, "n_points": n_points, "seed": 1})
    assert data.train.t.shape[1] == data.test.t.shape[1] == n_points
    assert np.all(data.test.lengths == n_points)
    np.testing.assert_array_equal(data.context, np.ceil(0.75 * n_points).astype(int))


def test_n_points_beyond_the_spiral_window_is_refused():
    with pytest.raises(DatasetError, match="dataset.n_points"):
        load_dataset({"name": "spirals", "n_samples": 10, "n_points": 101})


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_csv_long_format_keeps_missing_cells_and_per_series_times(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("series_id,t,y1,y2\na,0,1,2\na,0.5,,3\na,2,4,5\nb,1,1,1\nb,1.25,2,\nb,4,3,3\nb,5,1,1\n")
    data = timeseries.load_series(path)
    assert data.y.shape == (2, 4, 2) and data.lengths.tolist() == [3, 4]
    assert data.mask[0, 1].tolist() == [False, True] and data.mask[1, 1].tolist() == [True, False]
    np.testing.assert_array_equal(data.t[1], [1, 1.25, 4, 5])
    # the stored form (.npz, NaN-padded times) reads back to the same series
    (tmp_path / "s.npz").write_bytes(timeseries.save_npz(data))
    back = timeseries.load_series(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.lengths, data.lengths)
    np.testing.assert_array_equal(back.mask, data.mask)


@pytest.mark.parametrize("text, match", [
    ("id,t,y\na,0,1\na,0,2\nb,0,1\nb,1,1\n", "row 3: t=0 is not after t=0 of series 'a'"),
    ("id,t,y\na,0,1\na,x,2\n", "row 3, column 2"),
    ("id,t,y\na,0,1\na,1,inf\n", "row 3"),
    ("id,t,y\na,0,1\na,1,2\nb,0,1\nb,1\n", "row 5 has 2 columns"),
    ("id,t,y\na,0,1\na,1,2\n", "1 series"),
    ("id,t,y\na,0,1\na,1,\nb,0,1\nb,1,2\n", "series 0 has fewer than 2 observed points"),
])
def test_bad_csv_names_the_row(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=match):
        timeseries.load_series(path)


def test_npz_mask_padding_and_errors(tmp_path):
    t = np.array([[0.0, 1.0, 2.0], [0.0, 0.5, np.nan]])
    y = np.arange(18, dtype=float).reshape(2, 3, 3)
    mask = np.ones((2, 3, 3), dtype=bool)
    mask[0, 1, 2] = False
    path = tmp_path / "ok.npz"
    path.write_bytes(_npz(t=t, y=y, mask=mask))
    data = timeseries.load_series(path)
    assert data.lengths.tolist() == [3, 2] and not data.mask[0, 1, 2] and not data.mask[1, 2].any()
    cases = [
        (dict(t=np.array([[0.0, 1.0, 0.5], [0, 1, 2]]), y=y), "series 0, point 2: times must be strictly increasing"),
        (dict(t=np.array([[0.0, np.nan, 2.0], [0, 1, 2]]), y=y), "series 0, point 1: time is not finite"),
        (dict(t=t, y=y[:, :, :, None]), "'y' \\(N, T, D\\)"),
        (dict(y=y), "'t' is missing"),
        (dict(t=np.zeros((2, 3000)), y=np.zeros((2, 3000, 1))), "too large"),
    ]
    for i, (arrays, match) in enumerate(cases):
        bad = tmp_path / f"bad{i}.npz"
        bad.write_bytes(_npz(**arrays))
        with pytest.raises(DatasetError, match=match):
            timeseries.load_series(bad)
    pickled = tmp_path / "obj.npz"
    pickled.write_bytes(_npz(t=np.array([object()]), y=y))
    with pytest.raises(DatasetError):
        timeseries.load_series(pickled)
