"""Trainers: smoke runs of every objective, metrics records, callbacks, exact resume, named errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from node_engine.errors import CheckpointError, DatasetError, MaxNumStepsError, NonFiniteLossError
from node_engine.inference import load_model
from node_engine.models.keyed_noise import keyed_normal
from node_engine.specs import SolverSection
from node_engine.training import Trainer, TrainingCallbacks, build_trainer


class Recorder(TrainingCallbacks):
    """Collects everything; optionally asks to stop once ``stop_at`` steps are done."""

    def __init__(self, stop_at: int | None = None):
        self.steps, self.evals, self.checkpoints = [], [], {}
        self.stop_at = stop_at

    def on_step(self, record):
        self.steps.append(record)

    def on_eval(self, metrics):
        self.evals.append(metrics)

    def on_checkpoint(self, name, data):
        self.checkpoints[name] = data

    def should_stop(self):
        return self.stop_at is not None and bool(self.steps) and self.steps[-1]["step"] >= self.stop_at


def _spec(model, dataset, iterations=4, **training):
    return {"model": model, "dataset": dataset, "solver": {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3},
            "training": {"iterations": iterations, "batch_size": 32, "eval_every": 2, "checkpoint_every": 3,
                         "log_every": 1, "seed": 0, **training}}


ODENET = {"type": "odenet", "channels": 8}
CNF_HUTCH = {"type": "cnf", "hidden_dims": [8, 8], "trace_estimator": "hutchinson", "kinetic_energy": 0.01,
             "jacobian_norm": 0.01}
SMALL_MOONS = {"name": "moons", "n_samples": 100, "test_fraction": 0.2, "seed": 3}
SMALL_DIGITS = {"name": "digits", "n_samples": 300, "seed": 1}


def test_mlp_learns_digits():
    trainer = build_trainer(_spec({"type": "mlp"}, {"name": "digits"}, iterations=150, batch_size=64, lr=3e-3,
                                  eval_every=150, checkpoint_every=1000))
    out = trainer.run()
    assert out["status"] == "completed" and out["step"] == 150
    assert out["test_accuracy"] > 0.9  # chance is 0.1; an MLP reaches ~0.95 on 8x8 digits
    assert trainer.num_parameters == 64 * 300 + 300 + 300 * 10 + 10


def test_odenet_records_callbacks_and_checkpoints():
    rec = Recorder()
    trainer = build_trainer(_spec(ODENET, SMALL_DIGITS, iterations=4))
    out = trainer.run(rec)
    assert [r["step"] for r in rec.steps] == [1, 2, 3, 4]
    for r in rec.steps:
        assert {"loss", "accuracy", "nfe_forward", "nfe_backward", "wall_seconds", "lr", "regularizers"} <= set(r)
        assert r["nfe_forward"] >= 6 and r["nfe_backward"] >= 6 and r["lr"] == 1e-3  # dopri5: >= 1 step each way
    assert [e["step"] for e in rec.evals] == [2, 4]
    assert 0 <= rec.evals[-1]["test_accuracy"] <= 1 and rec.evals[-1]["nfe_forward"] > 0
    assert sorted(rec.checkpoints) == ["final.safetensors", "step-000003.safetensors"]
    assert out["test_accuracy"] == rec.evals[-1]["test_accuracy"]
    # the final checkpoint serves predictions equal to the trained model's
    model = load_model(rec.checkpoints["final.safetensors"])
    raw = trainer.data.x_test[:5].numpy() * trainer.standardization.std[0] + trainer.standardization.mean[0]
    probs = model.predict(raw[:, 0])
    # served: float64, evaluation tolerances, per-sample steps; the same solve of the trained weights
    reference = copy.deepcopy(trainer.model).double().eval()
    reference.use_solver(SolverSection.from_spec(trainer.spec["solver"]).served())
    with torch.no_grad():
        expected = torch.softmax(reference(trainer.data.x_test[:5].double()), 1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    with pytest.raises(ValueError, match="shape"):
        model.predict(np.zeros((2, 28, 28)))


@pytest.mark.parametrize("adjoint", [False, True])
def test_step_size_is_the_mean_accepted_forward_step(adjoint):
    """A fixed grid of spacing h on [0, T] with T a multiple of h: every accepted step is h exactly."""
    cnf = {"type": "cnf", "hidden_dims": [4], "end_time": 0.5, "train_end_time": False}
    spec = _spec(cnf, SMALL_MOONS, iterations=2, batch_size=16, eval_every=100, checkpoint_every=100)
    spec["solver"] = {"method": "rk4", "step_size": 0.125, "adjoint": adjoint}
    rec = Recorder()
    build_trainer(spec).run(rec)
    assert [r["step_size"] for r in rec.steps] == [0.125, 0.125]
    # an adaptive solve: mean accepted step within (0, T]; a model without an ODE solve records none
    spec["solver"] = {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3, "adjoint": adjoint}
    rec = Recorder()
    build_trainer(spec).run(rec)
    assert all(0 < r["step_size"] <= 0.5 for r in rec.steps)
    rec = Recorder()
    build_trainer(_spec({"type": "mlp", "hidden": 4}, SMALL_DIGITS, iterations=1)).run(rec)
    assert "step_size" not in rec.steps[0]


def test_epochs_define_total_steps():
    trainer = build_trainer(_spec({"type": "mlp", "hidden": 10}, SMALL_DIGITS, epochs=2, batch_size=50))
    assert trainer.total_steps == 2 * math.ceil(240 / 50)


def _run_interrupted(spec, stop_at):
    full = build_trainer(spec)
    full_rec = Recorder()
    full.run(full_rec)
    first = build_trainer(spec)
    first_rec = Recorder(stop_at=stop_at)
    out = first.run(first_rec)
    assert out["status"] == "cancelled" and first.step == stop_at
    resumed = Trainer.from_checkpoint(first_rec.checkpoints[f"step-{stop_at:06d}.safetensors"])
    assert resumed.step == stop_at
    rest = Recorder()
    resumed.run(rest)
    return full, full_rec, first_rec, resumed, rest


@pytest.mark.parametrize("model, dataset", [(ODENET, SMALL_DIGITS), (CNF_HUTCH, SMALL_MOONS)],
                         ids=["odenet-adjoint", "cnf-hutchinson-rnode"])
def test_resume_continues_the_same_trajectory(model, dataset):
    # 80 (moons) or 240 (digits) training points in batches of 32: the run crosses epoch boundaries
    spec = _spec(model, dataset, iterations=7)
    full, full_rec, first_rec, resumed, rest = _run_interrupted(spec, stop_at=4)
    losses = [r["loss"] for r in first_rec.steps] + [r["loss"] for r in rest.steps]
    assert losses == [r["loss"] for r in full_rec.steps]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert full_rec.evals[-1] == rest.evals[-1]


def test_density_nll_reported_in_original_coordinates(tmp_path):
    """Scaling the data by c changes the NLL by exactly D log c (change of variables); training on the
    standardized data is identical, so the two runs must differ by that constant."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2)) @ np.array([[1.0, 0.5], [0.0, 0.3]]) + [2.0, -1.0]
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", 10.0 * x + 7.0)
    model = {"type": "cnf", "hidden_dims": [8]}
    out = [build_trainer(_spec(model, {"name": "upload", "path": str(tmp_path / f"{n}.npy")}, iterations=2)).run()
           for n in ("a", "b")]
    assert out[1]["test_nll"] - out[0]["test_nll"] == pytest.approx(2 * math.log(10.0), abs=1e-3)
    assert out[0]["test_bits_per_dim"] == pytest.approx(out[0]["test_nll"] / (2 * math.log(2)))


def test_planar_density_integrates_to_one_in_original_coordinates():
    rec = Recorder()
    trainer = build_trainer(_spec({"type": "planar", "num_layers": 4}, {"name": "8gaussians", "n_samples": 500},
                                  iterations=20, lr=1e-2, eval_every=20, checkpoint_every=100))
    trainer.run(rec)
    model = load_model(rec.checkpoints["final.safetensors"])
    assert model.dim == 2
    # 8gaussians lives within radius ~4.5; the flow's tails are Gaussian in standardized units
    grid = np.linspace(-12, 12, 401)
    xx, yy = np.meshgrid(grid, grid)
    log_p, nfe = model.log_density(np.stack([xx.ravel(), yy.ravel()], 1))
    assert nfe == 0  # a discrete flow solves no ODE
    mass = np.exp(log_p).sum() * (grid[1] - grid[0]) ** 2
    assert mass == pytest.approx(1.0, abs=0.01)
    samples = model.sample(2000, seed=5)
    np.testing.assert_array_equal(samples, model.sample(2000, seed=5))
    # samples are mapped back to original coordinates: x = z * std + mean of the training data
    # base points keyed by (seed, index), pushed through the served float64 flow
    z = model.model.generate(keyed_normal(5, 2000, 2, dtype=torch.float64)).detach().numpy()
    np.testing.assert_allclose(samples, z * trainer.standardization.std + trainer.standardization.mean, rtol=1e-6)
    assert not np.allclose(trainer.standardization.std, 1.0, atol=0.3)


def test_density_matching_on_energy_target_improves():
    rec = Recorder()
    trainer = build_trainer(_spec({"type": "planar", "num_layers": 8}, {"name": "u1"}, iterations=60,
                                  batch_size=128, lr=1e-2, eval_every=60, checkpoint_every=100))
    out = trainer.run(rec)
    assert trainer.kind == "energy"
    first, last = np.mean([r["loss"] for r in rec.steps[:5]]), np.mean([r["loss"] for r in rec.steps[-5:]])
    assert last < first  # E_q[log q + U] decreases: q approaches exp(-U)/Z
    assert {"test_loss", "test_ess"} <= set(out)
    density = load_model(rec.checkpoints["final.safetensors"])
    assert density.sample(10, seed=0).shape == (10, 2)


def test_non_finite_loss_names_the_step():
    trainer = build_trainer(_spec({"type": "mlp", "hidden": 20}, {"name": "digits"}, iterations=10, lr=10.0))
    for group in trainer.optimizer.param_groups:  # beyond the spec's bound (lr <= 10): certain to diverge
        group["lr"] = 1e30
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ \(of 10\).*learning rate"):
        trainer.run()


def test_solver_failure_propagates_as_named_error():
    spec = _spec(ODENET, SMALL_DIGITS)
    spec["solver"].update(rtol=1e-9, atol=1e-9, max_num_steps=3)
    with pytest.raises(MaxNumStepsError) as info:
        build_trainer(spec).run()
    assert any("training step 1" in note for note in getattr(info.value, "__notes__", []))


def test_spec_errors():
    with pytest.raises(ValueError, match="model.type must be one of"):
        build_trainer(_spec({"type": "cnf"}, {"name": "digits"}))
    with pytest.raises(ValueError, match="model.type must be one of"):
        build_trainer(_spec({"type": "odenet"}, {"name": "moons"}))
    with pytest.raises(DatasetError, match="unknown dataset"):
        build_trainer(_spec({"type": "cnf"}, {"name": "mnist8"}))
    with pytest.raises(ValueError, match="batch_size"):
        build_trainer(_spec({"type": "mlp"}, {"name": "digits"}, batch_size=0))
    bad_solver = _spec({"type": "odenet"}, {"name": "digits"})
    bad_solver["solver"]["method"] = "dopri7"
    with pytest.raises(ValueError, match="solver.method must be one of .*got 'dopri7'"):
        build_trainer(bad_solver)
    with pytest.raises(ValueError, match="unknown training option"):
        build_trainer(_spec({"type": "mlp"}, {"name": "digits"}, learning_rate=0.1))


def test_tampered_or_mismatched_checkpoint_refused(tmp_path):
    trainer = build_trainer(_spec({"type": "mlp", "hidden": 10}, SMALL_DIGITS, iterations=1))
    trainer.run()
    data = bytearray(trainer.checkpoint())
    data[-10] ^= 1
    with pytest.raises(CheckpointError, match="digest"):
        Trainer.from_checkpoint(bytes(data))
    with pytest.raises(CheckpointError):
        load_model(bytes(data))
    # an uploaded file that changed since the checkpoint: the statistics no longer match
    np.save(tmp_path / "u.npy", np.random.default_rng(0).normal(size=(50, 2)))
    up = build_trainer(_spec({"type": "planar", "num_layers": 2}, {"name": "upload", "path": str(tmp_path / "u.npy")},
                             iterations=1))
    up.run()
    saved = up.checkpoint()
    np.save(tmp_path / "u.npy", np.random.default_rng(1).normal(size=(50, 2)))
    with pytest.raises(CheckpointError, match="differs"):
        Trainer.from_checkpoint(saved)


def test_resume_reads_the_upload_where_the_resuming_worker_sees_it(tmp_path):
    # The worker that resumes may mount the artifact store elsewhere: the stored path is gone, the
    # same file lives under another name, and dataset_path points the trainer at it.
    first, moved = tmp_path / "a" / "u.npy", tmp_path / "b" / "u.npy"
    first.parent.mkdir()
    moved.parent.mkdir()
    np.save(first, np.random.default_rng(0).normal(size=(60, 2)))
    spec = _spec({"type": "planar", "num_layers": 2}, {"name": "upload", "path": str(first)}, iterations=3)
    uninterrupted = build_trainer(spec)
    uninterrupted.run()
    stopped = build_trainer(spec)
    stopped.run(Recorder(stop_at=1))
    saved = stopped.checkpoint()
    first.rename(moved)
    with pytest.raises(DatasetError):
        Trainer.from_checkpoint(saved)
    resumed = Trainer.from_checkpoint(saved, dataset_path=str(moved))
    resumed.run()
    for a, b in zip(resumed.model.parameters(), uninterrupted.model.parameters()):
        assert torch.equal(a, b)


def test_mlp_on_digits_learns_with_the_defaults():
    # {"model": {"type": "mlp"}, "dataset": {"name": "digits"}}: the classifier family's batch of 128
    # (Chen et al. 2018) gives 12 steps an epoch; at FFJORD's 512 it was 3 and 5 epochs reached 87%
    spec = {"model": {"type": "mlp"}, "dataset": {"name": "digits"}, "training": {"epochs": 5, "eval_every": 10**6}}
    trainer = build_trainer(spec)
    assert trainer.config.batch_size == 128
    out = trainer.run()
    assert out["step"] == 5 * 12 and out["test_accuracy"] > 0.89  # measured 0.916
