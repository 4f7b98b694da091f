"""Data sets: determinism, FFJORD geometry (against the definitions), splits, validation, IDX, uploads."""

from __future__ import annotations

import gzip
import math
import struct

import numpy as np
import pytest
import scipy.stats
import sklearn.datasets

from node_engine.datasets import DATASETS, DatasetError, Standardization, load_dataset, split_indices
from node_engine.datasets import tabular
from node_engine.datasets.images import MNIST_FILES, read_idx
from node_engine.datasets.toy2d import TOY_GENERATORS

TOYS = ["swissroll", "circles", "rings", "moons", "8gaussians", "pinwheel", "2spirals", "checkerboard"]


def test_registry_names():
    assert set(TOYS) <= set(DATASETS)
    assert {"u1", "u2", "u3", "u4", "digits", "mnist", "upload"} <= set(DATASETS)
    assert {DATASETS[n].kind for n in TOYS} == {"density"}
    assert DATASETS["u3"].kind == "energy" and DATASETS["digits"].kind == "classifier"


def test_unknown_name_lists_known():
    with pytest.raises(DatasetError, match="unknown dataset 'gaussians8'.*8gaussians"):
        load_dataset({"name": "gaussians8"})


@pytest.mark.parametrize("name", TOYS)
def test_toys_seeded_and_shaped(name):
    a = TOY_GENERATORS[name](1001, 3)
    b = TOY_GENERATORS[name](1001, 3)
    c = TOY_GENERATORS[name](1001, 4)
    assert a.shape == (1001, 2) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_checkerboard_on_black_squares_and_uniform():
    x = TOY_GENERATORS["checkerboard"](40000, 0)
    assert x.min() >= -4 and x.max() < 4
    cells = np.floor(x / 2).astype(int)
    assert np.all((cells[:, 0] + cells[:, 1]) % 2 == 0)  # only the 8 "black" squares
    counts = np.unique(cells[:, 0] * 10 + cells[:, 1], return_counts=True)[1]
    assert len(counts) == 8
    # each square holds 1/8 of the mass: chi-square test against the uniform distribution
    assert scipy.stats.chisquare(counts).pvalue > 1e-3


def test_eight_gaussians_geometry():
    x = TOY_GENERATORS["8gaussians"](40000, 1)
    angles = np.arange(8) * np.pi / 4
    centers = 4 / 1.414 * np.stack([np.cos(angles), np.sin(angles)], 1)
    nearest = np.argmin(((x[:, None] - centers[None]) ** 2).sum(-1), axis=1)
    resid = x - centers[nearest]
    # per-coordinate std 0.5 / 1.414 (FFJORD); clusters are far apart so the assignment is exact
    np.testing.assert_allclose(resid.std(axis=0), 0.5 / 1.414, rtol=0.02)
    assert scipy.stats.chisquare(np.bincount(nearest, minlength=8)).pvalue > 1e-3


def test_rings_radii():
    r = np.linalg.norm(TOY_GENERATORS["rings"](8000, 0), axis=1)
    nearest = np.array([3.0, 2.25, 1.5, 0.75])[np.argmin(np.abs(r[:, None] - [3.0, 2.25, 1.5, 0.75]), axis=1)]
    assert np.abs(r - nearest).std() < 0.1  # noise 0.08 per coordinate


def test_sklearn_based_toys_match_their_definition():
    moons = TOY_GENERATORS["moons"](500, 7)
    ref = sklearn.datasets.make_moons(500, noise=0.1, random_state=7)[0] * 2 + [-1, -0.2]
    np.testing.assert_allclose(moons, ref)
    circles = TOY_GENERATORS["circles"](500, 7)
    np.testing.assert_allclose(circles, sklearn.datasets.make_circles(500, factor=0.5, noise=0.08, random_state=7)[0] * 3)


def test_split_is_seeded_disjoint_and_complete():
    tr, te = split_indices(1000, 0.2, 5)
    tr2, te2 = split_indices(1000, 0.2, 5)
    np.testing.assert_array_equal(tr, tr2)
    assert len(te) == 200 and len(np.intersect1d(tr, te)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.arange(1000))
    assert not np.array_equal(te, split_indices(1000, 0.2, 6)[1])
    with pytest.raises(DatasetError, match="test_fraction"):
        split_indices(100, 1.5, 0)


def test_density_dataset_standardized_with_train_statistics():
    d = load_dataset({"name": "moons", "n_samples": 2000, "test_fraction": 0.25, "seed": 2})
    raw = TOY_GENERATORS["moons"](2000, 2)
    tr, te = split_indices(2000, 0.25, 2)
    np.testing.assert_allclose(d.standardization.mean, raw[tr].mean(0))
    np.testing.assert_allclose(d.test.numpy(), (raw[te] - raw[tr].mean(0)) / raw[tr].std(0), rtol=1e-5, atol=1e-5)
    again = load_dataset({"name": "moons", "n_samples": 2000, "test_fraction": 0.25, "seed": 2})
    assert np.array_equal(d.train.numpy(), again.train.numpy())


def test_standardization_log_jacobian_matches_scipy():
    rng = np.random.default_rng(0)
    mean, std = np.array([3.0, -1.0, 0.5]), np.array([2.0, 0.1, 7.0])
    s = Standardization(mean, std)
    x = rng.normal(size=(5, 3)) * std + mean
    log_pz = scipy.stats.multivariate_normal(np.zeros(3), np.eye(3)).logpdf(s.forward(x))
    expected = scipy.stats.multivariate_normal(mean, np.diag(std**2)).logpdf(x)
    np.testing.assert_allclose(log_pz + s.log_abs_det_jacobian(), expected, rtol=1e-12)
    np.testing.assert_allclose(s.inverse(s.forward(x)), x)


def test_digits():
    d = load_dataset({"name": "digits", "test_fraction": 0.2, "seed": 0})
    assert d.input_shape == (1, 8, 8)
    assert len(d.y_train) + len(d.y_test) == 1797 and len(d.y_test) == round(1797 * 0.2)
    assert abs(float(d.x_train.mean())) < 1e-5 and abs(float(d.x_train.std()) - 1) < 1e-3
    assert set(d.y_train.tolist()) == set(range(10))


def _write_idx(path, array, gz=False):
    codes = {np.dtype(np.uint8): 0x08}
    payload = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    payload += array.tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def _write_mnist(directory, n_train=30, n_test=10, gz=False):
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
              "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_labels": (np.arange(n_test) % 10).astype(np.uint8)}
    for key, stem in MNIST_FILES.items():
        _write_idx(directory / (stem + (".gz" if gz else "")), arrays[key], gz=gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx(tmp_path, gz):
    arrays = _write_mnist(tmp_path, gz=gz)
    d = load_dataset({"name": "mnist", "path": str(tmp_path)})
    assert d.input_shape == (1, 28, 28) and len(d.y_train) == 30 and len(d.y_test) == 10
    raw = arrays["test_images"].astype(np.float64)
    mean, std = arrays["train_images"].mean(), arrays["train_images"].std()
    np.testing.assert_allclose(d.x_test[:, 0].numpy(), (raw - mean) / std, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(d.y_test.numpy(), arrays["test_labels"])


def test_mnist_missing_files_named(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError) as info:
        load_dataset({"name": "mnist", "path": str(tmp_path)})
    assert str(tmp_path) in str(info.value) and "t10k-labels-idx1-ubyte" in str(info.value)


def test_mnist_without_directory(monkeypatch):
    monkeypatch.delenv("ODEFORGE_MNIST_DIR", raising=False)
    with pytest.raises(DatasetError, match="ODEFORGE_MNIST_DIR"):
        load_dataset({"name": "mnist"})


def test_idx_header_checked(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 9)
    with pytest.raises(DatasetError, match="10 bytes"):
        read_idx(path)
    path.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DatasetError, match="magic"):
        read_idx(path)


def test_upload_npy_and_csv(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(200, 3)) * [1, 10, 100]
    np.save(tmp_path / "a.npy", data)
    np.savetxt(tmp_path / "a.csv", data, delimiter=",", header="x,y,z", comments="")
    a = load_dataset({"name": "upload", "path": str(tmp_path / "a.npy"), "seed": 1})
    b = load_dataset({"name": "upload", "path": str(tmp_path / "a.csv"), "seed": 1})
    assert a.dim == 3 and len(a.train) + len(a.test) == 200
    np.testing.assert_allclose(a.train.numpy(), b.train.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (np.array([[1.0, np.nan]] * 20), "non-finite"),
    (np.ones((20, 2)), "constant"),
    (np.zeros((5, 2)) + np.arange(5)[:, None], "rows"),
    (np.zeros((20, 2, 2)), "2-D"),
])
def test_upload_validation(tmp_path, bad, message):
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(DatasetError, match=message):
        load_dataset({"name": "upload", "path": str(tmp_path / "bad.npy")})


def test_upload_refuses_pickles_suffixes_and_big_files(tmp_path, monkeypatch):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 20, dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match="obj.npy"):
        load_dataset({"name": "upload", "path": str(tmp_path / "obj.npy")})
    (tmp_path / "x.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(DatasetError, match="unsupported"):
        load_dataset({"name": "upload", "path": str(tmp_path / "x.pkl")})
    np.save(tmp_path / "ok.npy", np.random.default_rng(0).normal(size=(100, 2)))
    monkeypatch.setattr(tabular, "MAX_FILE_BYTES", 100)
    with pytest.raises(DatasetError, match="exceeds"):
        load_dataset({"name": "upload", "path": str(tmp_path / "ok.npy")})
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset({"name": "upload", "path": str(tmp_path / "missing.npy")})


def test_energy_targets_registered():
    d = load_dataset({"name": "u1"})
    assert d.kind == "energy" and d.dim == 2
    import torch
    u = d.energy(torch.zeros(4, 2))
    assert u.shape == (4,) and torch.all(torch.isfinite(u))
    assert math.isfinite(float(u[0]))
