"""The ``rnn`` baseline (GRU with Δt input, Chen et al. 2018 §5.1): its answers against a hand-run
recursion (teacher forcing inside the observations, autoregression past them), training on spirals,
deterministic forecasts that do not depend on the other series, and a checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from node_engine.inference import load_model
from node_engine.models.rnn import GRUBaseline
from node_engine.training import Trainer, TrainingCallbacks, build_trainer

SPEC = {"model": {"type": "rnn", "hidden": 16}, "dataset": {"name": "spirals", "n_samples": 30, "n_points": 12},
        "training": {"iterations": 30, "batch_size": 8, "lr": 2e-2, "eval_every": 30}}


def test_answers_follow_the_gru_recursion_inside_and_autoregression_past_the_observations():
    torch.manual_seed(0)
    model = GRUBaseline(2, 5).double()
    t_obs = np.array([0.0, 0.5, 1.2])
    y_obs = np.array([[1.0, -1.0], [0.3, 0.0], [0.2, 0.7]])
    m_obs = np.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    wanted = np.array([0.0, 0.5, 0.8, 1.2, 2.0, 2.6])

    def gru(x, h):
        return model.gru(torch.as_tensor(np.asarray(x, dtype=np.float64))[None], torch.as_tensor(h)[None])[0].numpy()

    def dec(h, gap):
        return model.decoder(torch.as_tensor(np.append(h, gap))[None])[0].numpy()

    with torch.no_grad():
        states, h = [], np.zeros(5)
        for i in range(3):  # h_i = GRU([y ⊙ m, m, t_i − t_{i−1}], h_{i−1})
            gap = t_obs[i] - t_obs[i - 1] if i else 0.0
            h = gru(np.concatenate([y_obs[i] * m_obs[i], m_obs[i], [gap]]), h)
            states.append(h)
        want = [y_obs[0] * m_obs[0],  # the first observation itself
                dec(states[0], 0.5),  # t = 0.5 is predicted from before it
                dec(states[1], 0.3), dec(states[1], 0.7)]
        p1 = dec(states[2], 0.8)  # past the end: feed predictions back
        h = gru(np.concatenate([p1, [1.0, 1.0], [0.8]]), states[2])
        want += [p1, dec(h, 0.6)]
        got = model.predict(*(torch.as_tensor(a)[None] for a in (t_obs, y_obs, m_obs)), torch.tensor([3]),
                            torch.as_tensor(wanted)[None])[0].numpy()
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-12, atol=1e-14)


@pytest.fixture(scope="module")
def trained():
    trainer = build_trainer(SPEC)
    records = []

    class Record(TrainingCallbacks):
        def on_step(self, record):
            records.append(record)

    return trainer, records, trainer.run(Record())


def test_rnn_trains_on_spirals(trained):
    trainer, records, result = trained
    loss = [r["loss"] for r in records]
    assert np.mean(loss[-5:]) < 0.5 * np.mean(loss[:3]), loss
    assert all(r["nfe_forward"] == 0 for r in records)  # no ODE
    assert result["test_interp_mse"] > 0 and result["test_extrap_mse"] > 0


def test_forecasts_are_deterministic_batch_independent_and_survive_a_checkpoint_round_trip(trained):
    trainer = trained[0]
    served = load_model(trainer.checkpoint())
    again = load_model(Trainer.from_checkpoint(trainer.checkpoint()).checkpoint())
    assert not served.samples and not served.needs_observed_start
    rng = np.random.default_rng(1)
    probe = (np.array([0.1, 0.4, 0.5, 0.9]), rng.normal(size=(4, 2)), None)
    probe[1][0, 0] = np.nan  # the first point need not be fully observed
    times = np.array([0.3, 0.9, 1.4, 2.0])
    (alone,), drawn, nfe = served.forecast_series([probe], times)
    assert drawn is None and nfe == 0 and alone.shape == (4, 2)
    others = [(np.cumsum(rng.uniform(0.1, 0.3, size=n)) - 0.5, rng.normal(size=(n, 2)), None) for n in (2, 7, 3)]
    means, _, _ = served.forecast_series([others[0], probe, *others[1:]], times)
    np.testing.assert_allclose(means[1], alone, rtol=1e-10, atol=1e-12)
    (round_trip,), _, _ = again.forecast_series([probe], times)
    np.testing.assert_array_equal(round_trip, alone)
    with pytest.raises(ValueError, match="samples"):
        served.forecast_series([probe], times, samples=2)
