"""The ``latent_ode`` model (Rubanova et al. 2019): its ELBO pieces against scipy/torch.distributions,
the ODE-RNN encoder against a hand-run recursion with a linear field (matrix exponentials), masked
values never read, the adjoint (union grid) and backprop paths giving one gradient, KL annealing,
training on spirals, and served forecasts with posterior draws that do not depend on the other series
of a request and survive a checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import expm
from scipy.stats import norm

from node_engine.inference import load_model
from node_engine.models.latent_ode import LatentODE, gaussian_log_likelihood, kl_to_standard_normal
from node_engine.specs import LatentODESection, SolverSection
from node_engine.training import Trainer, TrainingCallbacks, build_trainer

SPEC = {"model": {"type": "latent_ode", "latent_dim": 3, "hidden": 12, "rec_hidden": 8, "kl_anneal_steps": 4},
        "dataset": {"name": "spirals", "n_samples": 20, "n_points": 8, "seed": 2},
        "solver": {"rtol": 1e-3, "atol": 1e-4, "eval_rtol": 1e-8, "eval_atol": 1e-9, "adjoint": False},
        "training": {"iterations": 8, "batch_size": 8, "lr": 2e-2, "eval_every": 8}}


def _model(dim=2, **solver) -> LatentODE:
    torch.manual_seed(3)
    model = LatentODE(dim, LatentODESection(latent_dim=3, hidden=10, rec_hidden=6),
                      SolverSection(**{"rtol": 1e-10, "atol": 1e-12, "adjoint": False, **solver}))
    return model.double()


def test_masked_gaussian_log_likelihood_matches_scipy():
    rng = np.random.default_rng(0)
    y, mean = rng.normal(size=(3, 5, 2)), rng.normal(size=(3, 5, 2))
    mask = rng.random((3, 5, 2)) < 0.6
    got = gaussian_log_likelihood(*(torch.as_tensor(a) for a in (y, mean, mask.astype(float))), 0.3).numpy()
    want = np.where(mask, norm.logpdf(y, loc=mean, scale=0.3), 0.0).sum(axis=(1, 2))
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_kl_to_standard_normal_matches_torch_distributions():
    mu, std = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64) + 0.1
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mu, std),
                                             torch.distributions.Normal(0.0, 1.0)).sum(-1)
    np.testing.assert_allclose(kl_to_standard_normal(mu, std).numpy(), want.numpy(), rtol=1e-12, atol=1e-14)


class _Linear(torch.nn.Module):
    def __init__(self, a: np.ndarray):
        super().__init__()
        self.a = torch.as_tensor(a)

    def forward(self, t, h):
        return h @ self.a.T


def test_ode_rnn_encoder_matches_a_hand_run_recursion_with_a_linear_field():
    """dh/dt = A h between observations is h(t_j) = expm(A (t_j − t_{j+1})) h(t_{j+1}) (backwards in time);
    at each observation the GRU reads [y ⊙ m, m]; rows of different lengths are padded."""
    model = _model()
    rng = np.random.default_rng(1)
    a = rng.normal(scale=0.5, size=(6, 6))
    model.encoder.field = _Linear(a)
    t = np.array([[0.0, 0.4, 1.1, 1.5], [0.2, 0.9, 1.0, 1.0 + 1e-6]])  # row 1: 3 points, then padding
    y = rng.normal(size=(2, 4, 2))
    mask = np.ones((2, 4, 2))
    mask[0, 2, 1] = 0.0
    mask[1, 1] = 0.0  # nothing observed: h passes unchanged
    lengths = np.array([4, 3])
    with torch.no_grad():
        h = model.encoder.hidden(torch.as_tensor(t), torch.as_tensor(y), torch.as_tensor(mask),
                                 torch.as_tensor(lengths), model._evolve).numpy()
    for b in range(2):
        ref = np.zeros(6)
        for j in reversed(range(lengths[b])):
            if j + 1 < lengths[b]:
                ref = expm(a * (t[b, j] - t[b, j + 1])) @ ref
            if mask[b, j].any():
                x = torch.as_tensor(np.concatenate([y[b, j] * mask[b, j], mask[b, j]]))[None]
                with torch.no_grad():
                    ref = model.encoder.gru(x, torch.as_tensor(ref)[None])[0].numpy()
        np.testing.assert_allclose(h[b], ref, rtol=1e-8, atol=1e-10)


def test_the_encoder_never_reads_masked_out_values():
    model = _model()
    rng = np.random.default_rng(2)
    t = torch.as_tensor(np.cumsum(rng.uniform(0.1, 0.5, size=(3, 6)), axis=1))
    y = torch.as_tensor(rng.normal(size=(3, 6, 2)))
    mask = torch.as_tensor((rng.random((3, 6, 2)) < 0.6).astype(float))
    mask[:, 0, 0] = 1.0
    lengths = torch.tensor([6, 4, 5])
    with torch.no_grad():
        mu, std = model.posterior(t, y, mask, lengths)
        changed = torch.where(mask > 0, y, y + 100.0 * torch.randn_like(y))
        changed[1, 4:] = 1e6  # past the length: padding
        mu2, std2 = model.posterior(t, changed, mask, lengths)
        mu3, _ = model.posterior(t, torch.where(mask > 0, y + 1.0, y), mask, lengths)
    assert torch.equal(mu, mu2) and torch.equal(std, std2)
    assert not torch.allclose(mu, mu3)  # observed values do matter


def test_adjoint_and_backprop_give_the_same_gradient():
    """solver.adjoint: the latent trajectory is solved jointly on the union of the rows' relative times and
    differentiated by the adjoint; without it, per row by backprop. Same loss and gradient (tight tolerances)."""
    rng = np.random.default_rng(4)
    t = torch.as_tensor(np.concatenate([[[0.0]] * 3, np.cumsum(rng.uniform(0.1, 0.4, size=(3, 4)), axis=1)], 1))
    t = t + torch.tensor([[0.0], [0.5], [1.0]], dtype=torch.float64)  # rows start at different times
    y = torch.as_tensor(rng.normal(size=(3, 5, 2)))
    mask, lengths = torch.ones(3, 5, 2, dtype=torch.float64), torch.tensor([5, 5, 5])
    grads = []
    for adjoint in (False, True):
        model = _model(adjoint=adjoint)
        loss, _ = model.loss(t, y, mask, lengths, torch.Generator().manual_seed(0))
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-8)
    np.testing.assert_allclose(grads[1][1].numpy(), grads[0][1].numpy(), rtol=1e-6, atol=1e-8)


@pytest.fixture(scope="module")
def trained():
    trainer = build_trainer(SPEC)
    records = []

    class Record(TrainingCallbacks):
        def on_step(self, record):
            records.append(record)

    result = trainer.run(Record())
    return trainer, records, result


def test_latent_ode_trains_on_spirals_with_kl_annealing(trained):
    trainer, records, result = trained
    loss = [r["loss"] for r in records]
    assert np.mean(loss[-3:]) < 0.7 * np.mean(loss[:2]), loss
    # the KL weight ramps linearly over kl_anneal_steps = 4 training steps, then stays at 1
    assert [r["kl_weight"] for r in records[:6]] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert all(r["kl"] >= 0 and r["nfe_forward"] > 0 for r in records)
    assert result["test_interp_mse"] > 0 and result["test_extrap_mse"] > 0 and result["nfe_forward"] > 0


def test_a_resumed_run_continues_the_kl_ramp(trained):
    trainer = trained[0]
    resumed = Trainer.from_checkpoint(trainer.checkpoint())
    assert int(resumed.model.train_steps) == trainer.step == 8 and resumed.model.kl_weight() == 1.0


def _series(rng, start, n):
    t = start + np.cumsum(rng.uniform(0.05, 0.3, size=n))
    y = rng.normal(size=(n, 2)) * 3.0
    y[1, 0] = np.nan  # a missing value
    return t, y, None


def test_forecast_with_draws_does_not_depend_on_the_other_series_and_is_reproducible(trained):
    served = load_model(trained[0].checkpoint())
    assert served.samples and not served.needs_observed_start
    rng = np.random.default_rng(5)
    probe = _series(rng, 0.0, 6)
    probe[1][0, 1] = np.nan  # a latent model needs no fully observed first point
    times = np.array([0.5, 1.0, 2.0, 3.5])
    (mean,), (draws,), nfe = served.forecast_series([probe], times, samples=3, seed=7)
    assert mean.shape == (4, 2) and draws.shape == (3, 4, 2) and nfe > 0
    assert np.isfinite(draws).all() and np.std(draws, axis=0).min() > 0  # distinct draws
    others = [_series(rng, s, n) for s, n in ((0.0, 3), (-1.0, 9), (0.2, 5))]
    for batch, at in (([probe, *others], 0), ([*others[:2], probe, others[2]], 2)):
        means, drawn, _ = served.forecast_series(batch, times, samples=3, seed=7)
        np.testing.assert_allclose(means[at], mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(drawn[at], draws, rtol=1e-10, atol=1e-12)
    (mean_again,), (other_draws,), _ = served.forecast_series([probe], times, samples=3, seed=8)
    np.testing.assert_allclose(mean_again, mean, rtol=1e-12)  # the mean does not depend on the seed
    assert not np.allclose(other_draws, draws)


def test_forecast_mean_is_the_decoded_posterior_mean_in_user_units_after_a_checkpoint_round_trip(trained):
    trainer = trained[0]
    served = load_model(Trainer.from_checkpoint(trainer.checkpoint()).checkpoint())
    st = trainer.data.standardization
    rng = np.random.default_rng(6)
    t_obs, y_obs, _ = _series(rng, 0.0, 5)
    times = t_obs[0] + np.array([0.0, 0.7, 1.9])  # its start, inside and past its observations
    (mean,), _, _ = served.forecast_series([(t_obs, y_obs, None)], times)
    model = trainer.model.double().eval()  # the trained weights, outside the served wrapper
    model.set_tolerances(1e-8, 1e-9)
    mask = ~np.isnan(y_obs)
    with torch.no_grad():
        z = torch.as_tensor(np.where(mask, (np.nan_to_num(y_obs) - st.mean) / st.std, 0.0))[None]
        mu, _ = model.posterior(torch.as_tensor(t_obs)[None], z, torch.as_tensor(mask, dtype=torch.float64)[None],
                                torch.tensor([5]))
        # z(t) from an independent fine fixed-grid solve of the latent field
        s, zt, path = 0.0, mu[0].clone(), {}
        for target in times - t_obs[0]:
            while s < target - 1e-12:
                h = min(5e-3, target - s)
                k1 = model.field(None, zt[None])[0]
                k2 = model.field(None, (zt + h / 2 * k1)[None])[0]
                k3 = model.field(None, (zt + h / 2 * k2)[None])[0]
                k4 = model.field(None, (zt + h * k3)[None])[0]
                zt, s = zt + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), s + h
            path[target] = model.decoder(zt[None])[0].numpy()
    want = np.stack([path[k] for k in times - t_obs[0]]) * st.std + st.mean
    np.testing.assert_allclose(mean, want, rtol=1e-6, atol=1e-7)


def test_a_series_without_a_fully_observed_start_trains_a_latent_ode_but_not_a_node(tmp_path):
    rng = np.random.default_rng(7)
    t = np.cumsum(rng.uniform(0.1, 0.3, size=(6, 5)), axis=1)
    y = rng.normal(size=(6, 5, 2))
    y[0, 0, 1] = np.nan  # series 0 starts half observed
    np.savez(tmp_path / "s.npz", t=t, y=y)
    dataset = {"name": "series_upload", "path": str(tmp_path / "s.npz"), "test_fraction": 0.34}
    spec = {"model": {"type": "latent_ode", "latent_dim": 2, "hidden": 4, "rec_hidden": 3}, "dataset": dataset,
            "solver": {"adjoint": False}, "training": {"iterations": 1, "batch_size": 4}}
    assert np.isfinite(build_trainer(spec).run()["loss"])
    from node_engine.errors import DatasetError

    with pytest.raises(DatasetError, match="fully observed first point"):
        build_trainer({**spec, "model": {"type": "node"}})
