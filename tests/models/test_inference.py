"""load_model: density and classifier models from checkpoint bytes, in the user's coordinates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from node_engine.errors import CheckpointError
from node_engine.inference import ClassifierModel, DensityModel, load_model
from node_engine.training import build_trainer


@pytest.fixture(scope="module")
def cnf_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "g.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.normal(size=(400, 2)) * [3.0, 0.5] + [10.0, -2.0])
    spec = {"model": {"type": "cnf", "hidden_dims": [8]}, "dataset": {"name": "upload", "path": str(path)},
            "solver": {"rtol": 1e-4, "atol": 1e-4, "eval_rtol": 1e-6, "eval_atol": 1e-6},
            "training": {"iterations": 2, "batch_size": 64, "eval_every": 2, "checkpoint_every": 10}}
    trainer = build_trainer(spec)
    trainer.run()
    return trainer, trainer.checkpoint()


def test_density_model_matches_change_of_variables(cnf_checkpoint):
    trainer, data = cnf_checkpoint
    model = load_model(data)
    assert isinstance(model, DensityModel) and model.dim == 2 and model.step == 2
    x = np.array([[10.0, -2.0], [13.0, -1.5], [7.0, -2.5]])
    log_p, nfe = model.log_density(x)
    assert log_p.shape == (3,) and log_p.dtype == np.float64 and nfe > 0
    # independent of the code: log p_x = log p_z(z) - sum(log std), with the checkpoint's statistics
    s = trainer.standardization
    z = torch.as_tensor((x - s.mean) / s.std, dtype=torch.float32)
    trainer.model.set_tolerances(1e-6, 1e-6)
    log_pz = trainer.model.eval().log_prob(z).detach().double().numpy()
    np.testing.assert_allclose(log_p, log_pz - np.log(s.std).sum(), rtol=1e-5, atol=1e-5)
    # a barely trained flow is close to the standardized Gaussian fit of the data
    gauss = scipy.stats.multivariate_normal(s.mean, np.diag(s.std**2)).logpdf(x)
    assert np.all(np.abs(log_p - gauss) < 1.0)
    assert model.bits_per_dim(log_p)[0] == pytest.approx(-log_p[0] / (2 * math.log(2)))


def test_density_model_input_errors(cnf_checkpoint):
    model = load_model(cnf_checkpoint[1])
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        model.log_density(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="finite"):
        model.log_density(np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="n must be"):
        model.sample(0, seed=0)


def test_sampling_is_seeded_and_in_original_coordinates(cnf_checkpoint):
    model = load_model(cnf_checkpoint[1])
    a, b, c = model.sample(500, seed=1), model.sample(500, seed=1), model.sample(500, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # the data's location and scale (mean (10, -2), std (3, 0.5)), not the standardized origin: an untrained
    # flow is within about one standard deviation of the Gaussian fit
    assert np.all(np.abs(a.mean(0) - [10.0, -2.0]) < [3.0, 0.5])
    assert np.all((a.std(0) > [1.0, 0.15]) & (a.std(0) < [9.0, 1.5]))


def test_classifier_model_kind_and_garbage():
    trainer = build_trainer({"model": {"type": "mlp", "hidden": 10}, "dataset": {"name": "digits"},
                             "training": {"iterations": 1, "batch_size": 16}})
    trainer.run()
    model = load_model(trainer.checkpoint())
    assert isinstance(model, ClassifierModel) and model.input_shape == (1, 8, 8)
    assert model.predict(np.zeros((2, 1, 8, 8))).shape == (2, 10)
    with pytest.raises(CheckpointError):
        load_model(b"\x00" * 64)


@pytest.mark.parametrize("method", ["dopri8", "rk4"])
def test_log_density_for_every_solver_method(tmp_path, method):
    # Inference steps each point alone where the method allows it; dopri8 (extra dense stages) and
    # fixed-grid methods fall back to joint stepping instead of failing; the answer equals the
    # trained model's own log_prob shifted by the standardization's log-Jacobian.
    rng = np.random.default_rng(1)
    np.save(tmp_path / "g.npy", rng.normal(size=(200, 2)) * [2.0, 0.5] + [1.0, -1.0])
    solver = {"method": method, "rtol": 1e-6, "atol": 1e-6, "step_size": 0.05 if method == "rk4" else None}
    spec = {"model": {"type": "cnf", "hidden_dims": [8]}, "dataset": {"name": "upload", "path": str(tmp_path / "g.npy")},
            "solver": solver, "training": {"iterations": 1, "batch_size": 32, "eval_every": 1, "checkpoint_every": 1}}
    trainer = build_trainer(spec)
    trainer.run()
    model = load_model(trainer.checkpoint())
    x = np.array([[1.0, -1.0], [3.0, -0.5]])
    log_p, nfe = model.log_density(x)
    assert np.all(np.isfinite(log_p)) and nfe > 0
    s = trainer.standardization
    with torch.no_grad():
        expected = trainer.model.eval().log_prob(torch.as_tensor((x - s.mean) / s.std, dtype=torch.float32))
    np.testing.assert_allclose(log_p, expected.double().numpy() - np.log(s.std).sum(), rtol=1e-4, atol=1e-4)
