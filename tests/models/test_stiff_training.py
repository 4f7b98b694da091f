"""Job specs with the stiff method kvaerno5 (issue 16 item 6): a tiny time-series training run through
the trainer with backprop through per-sample solves (``node``, adjoint false) and with the checkpoint
adjoint on the joint solve (``latent_ode``, adjoint true), the served forecast of the trained model
(per-sample kvaerno5) against scipy's Radau on the learned field, and the named refusal of the
backsolve adjoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from node_engine.inference import load_model
from node_engine.models.latent_ode import LatentODE
from node_engine.specs import LatentODESection, SolverSection, normalize_spec
from node_engine.training import build_trainer

SOLVER = {"method": "kvaerno5", "rtol": 1e-3, "atol": 1e-4, "eval_rtol": 1e-5, "eval_atol": 1e-6}
NODE = {"model": {"type": "node", "hidden_dims": [8]},
        "dataset": {"name": "lotka_volterra", "n_samples": 10, "n_points": 5, "seed": 1},
        "solver": {**SOLVER, "adjoint": False},
        "training": {"iterations": 2, "batch_size": 3, "lr": 1e-2, "eval_every": 2}}
LATENT = {"model": {"type": "latent_ode", "latent_dim": 2, "hidden": 6, "rec_hidden": 4},
          "dataset": {"name": "spirals", "n_samples": 10, "n_points": 5, "seed": 2},
          "solver": {**SOLVER, "adjoint": True, "adjoint_mode": "checkpoint"},
          "training": {"iterations": 2, "batch_size": 3, "lr": 1e-2, "eval_every": 2}}


def _run(spec):
    torch.manual_seed(0)
    trainer = build_trainer(spec)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.run()
    moved = any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.model.parameters()))
    return trainer, result, moved


def test_node_trains_with_kvaerno5_and_serves_per_sample_forecasts():
    trainer, result, moved = _run(NODE)
    assert moved and trainer.model.stats.nfe_forward > 0
    served = load_model(trainer.checkpoint())
    assert served.model.solver.method == "kvaerno5"
    st = served.standardization
    t0, y0, times = 0.2, np.array([1.1, 0.8]), np.array([0.2, 0.7, 1.5])
    (mean,), nfe = served.forecast([(t0, y0)], times)
    assert nfe > 0

    def rhs(s, y):  # the learned field in the user's units, float64, solved outside the engine
        with torch.no_grad():
            z = torch.as_tensor((y - st.mean) / st.std)[None]
            return served.model.field(torch.tensor([s], dtype=torch.float64), z)[0].numpy() * st.std

    ref = solve_ivp(rhs, (t0, times[-1]), y0, method="Radau", t_eval=times, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mean, ref.y.T, rtol=1e-4, atol=1e-5)


def test_latent_ode_trains_with_kvaerno5_and_the_checkpoint_adjoint():
    trainer, result, moved = _run(LATENT)
    assert moved and trainer.model.stats.nfe_forward > 0


def test_latent_ode_kvaerno5_adjoint_and_backprop_give_the_same_gradient():
    """adjoint true: one joint kvaerno5 solve on the union of the rows' times, differentiated by the
    checkpoint adjoint; adjoint false: per-sample kvaerno5 solves, backprop. Same loss and gradient."""
    rng = np.random.default_rng(4)
    t = torch.as_tensor(np.concatenate([[[0.0]] * 2, np.cumsum(rng.uniform(0.1, 0.4, size=(2, 3)), axis=1)], 1))
    y = torch.as_tensor(rng.normal(size=(2, 4, 2)))
    mask, lengths = torch.ones(2, 4, 2, dtype=torch.float64), torch.tensor([4, 4])
    grads = []
    for adjoint in (False, True):
        torch.manual_seed(3)
        model = LatentODE(2, LatentODESection(latent_dim=2, hidden=6, rec_hidden=4),
                          SolverSection(method="kvaerno5", rtol=1e-8, atol=1e-10, adjoint=adjoint,
                                        adjoint_mode="checkpoint")).double()
        loss, _ = model.loss(t, y, mask, lengths, torch.Generator().manual_seed(0))
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    np.testing.assert_allclose(grads[1][1].numpy(), grads[0][1].numpy(), rtol=1e-5, atol=1e-7)


def test_kvaerno5_with_the_backsolve_adjoint_is_refused_by_name():
    spec = {**NODE, "solver": {**SOLVER, "adjoint": True}}  # adjoint_mode defaults to backsolve
    with pytest.raises(ValueError, match="solver.adjoint_mode.*checkpoint"):
        normalize_spec(spec)
    assert normalize_spec(LATENT)["solver"]["method"] == "kvaerno5"
