"""Properties any correct CNF has, checked on random and briefly trained FFJORD models in 2-D.

- its density integrates to 1 (Riemann sum over a grid covering the mass);
- the Hutchinson trace estimate is unbiased (CLT two-sided bound against the autograd Jacobian);
- x -> z -> x is the identity; samples follow the density (chi-square on binned counts);
- the generative and density directions agree; adjoint and backprop gradients agree.
"""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch.autograd.functional import jacobian

from node_engine.models.cnf import CNF
from node_engine.models.cnf_divergence import divergence_hutchinson, sample_noise
from node_engine.models.cnf_fields import ConcatSquashField

D64 = torch.float64
GRID_TOL = {"rtol": 1e-6, "atol": 1e-6, "adjoint": False}  # log p error ~1e-6: irrelevant at 1%
LIM, NGRID = 7.0, 112  # cells of side 0.125 over [-7, 7]²


def _grid():
    """Cell midpoints (so no point sits on a histogram edge) and the cell side."""
    h = 2 * LIM / NGRID
    g = -LIM + h * (torch.arange(NGRID, dtype=D64) + 0.5)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1), h


def _random_cnf(seed, **model):
    torch.manual_seed(seed)
    spec = {"type": "cnf", "hidden_dims": [32, 32], "num_blocks": 2, **model}
    return CNF.from_spec(spec, GRID_TOL, 2).to(D64)


def _mixture(n, gen):
    centers = torch.tensor([[-1.5, 0.0], [1.5, 0.5]], dtype=D64)
    idx = torch.randint(0, 2, (n,), generator=gen)
    return centers[idx] + 0.5 * torch.randn(n, 2, generator=gen, dtype=D64)


@pytest.fixture(scope="module")
def random_cnf():
    return _random_cnf(0, nonlinearity="softplus")


@pytest.fixture(scope="module")
def trained_cnf():
    """30 Adam steps of maximum likelihood through the adjoint (seminorm) at training tolerances."""
    torch.manual_seed(1)
    spec = {"type": "cnf", "hidden_dims": [32, 32], "trace_estimator": "hutchinson"}
    model = CNF.from_spec(spec, {"rtol": 1e-5, "atol": 1e-5, "adjoint": True}, 2).to(D64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = -model.log_prob(_mixture(64, gen)).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.trace_estimator = "exact"
    model.set_tolerances(GRID_TOL["rtol"], GRID_TOL["atol"])
    model.eval()
    model.losses = losses
    return model


@pytest.fixture(scope="module")
def random_density(random_cnf):
    pts, h = _grid()
    with torch.no_grad():
        return random_cnf.log_prob(pts).exp(), h


def test_random_cnf_integrates_to_one(random_density):
    dens, h = random_density
    assert dens.sum().item() * h * h == pytest.approx(1.0, abs=0.01)


def test_trained_cnf_integrates_to_one(trained_cnf):
    assert np.mean(trained_cnf.losses[-5:]) < np.mean(trained_cnf.losses[:5]) - 0.1  # it did train
    pts, h = _grid()
    with torch.no_grad():
        mass = trained_cnf.log_prob(pts).exp().sum().item() * h * h
    assert mass == pytest.approx(1.0, abs=0.01)
    assert trained_cnf.stats.nfe_backward > 0


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_estimator_is_unbiased(noise):
    torch.manual_seed(3)
    field = ConcatSquashField(3, (16, 16), "tanh").to(D64)
    t = torch.tensor(0.4, dtype=D64)
    points = torch.randn(3, 3, dtype=D64)
    k = 20000
    for p in points:
        exact = torch.trace(jacobian(lambda v: field(t, v[None])[0], p)).item()
        z = p.expand(k, 3).clone().requires_grad_(True)
        eps = sample_noise((k, 3), noise, dtype=D64, generator=torch.Generator().manual_seed(4))
        est, _ = divergence_hutchinson(field(t, z), z, eps, create_graph=False)
        mean, se = est.mean().item(), est.std().item() / math.sqrt(k)
        assert se > 0
        assert abs(mean - exact) < 5 * se  # two-sided, false-alarm rate ~6e-7


def test_hutchinson_log_prob_is_unbiased_and_noise_fixed_per_solve(random_cnf):
    x = torch.tensor([[0.3, -0.8]], dtype=D64)
    with torch.no_grad():
        exact = random_cnf.log_prob(x).item()
        nfe_exact = random_cnf.stats.nfe_forward
        model = _random_cnf(0, nonlinearity="softplus", trace_estimator="hutchinson")
        est = model.log_prob(x.expand(2000, 2), generator=torch.Generator().manual_seed(5))
    assert abs(est.mean().item() - exact) < 5 * est.std().item() / math.sqrt(2000)
    # noise drawn inside f would make the dynamics stochastic and the adaptive NFE explode
    exact_model = _random_cnf(0, nonlinearity="softplus")
    with torch.no_grad():
        exact_model.log_prob(x.expand(2000, 2))
    assert model.stats.nfe_forward <= 1.5 * exact_model.stats.nfe_forward
    assert nfe_exact > 0


def test_round_trip_recovers_points(trained_cnf):
    x = _mixture(200, torch.Generator().manual_seed(6))
    trained_cnf.set_tolerances(1e-9, 1e-9)
    with torch.no_grad():
        back = trained_cnf.from_base(trained_cnf.to_base(x))
    trained_cnf.set_tolerances(GRID_TOL["rtol"], GRID_TOL["atol"])
    torch.testing.assert_close(back, x, rtol=0, atol=1e-6)


def test_samples_follow_the_density(random_cnf, random_density):
    dens, h = random_density
    n = 20000
    samples = random_cnf.sample(n, generator=torch.Generator().manual_seed(7)).numpy()
    # 7x7 bins over [-3.5, 3.5]² plus one "outside" bin; expected mass per bin from the grid density
    edges = np.linspace(-3.5, 3.5, 8)
    pts, _ = _grid()
    pts = pts.numpy()
    w = dens.numpy() * h * h
    w = w / w.sum()
    expected = np.histogram2d(pts[:, 0], pts[:, 1], bins=[edges, edges], weights=w)[0].ravel()
    observed = np.histogram2d(samples[:, 0], samples[:, 1], bins=[edges, edges])[0].ravel()
    expected = np.append(expected, 1 - expected.sum()) * n
    observed = np.append(observed, n - observed.sum())
    keep = expected > 5
    p_value = scipy.stats.chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum()).pvalue
    assert p_value > 1e-4


def test_sample_and_log_prob_agrees_with_log_prob(trained_cnf):
    x, log_q = trained_cnf.sample_and_log_prob(50, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(trained_cnf.log_prob(x.detach()), log_q.detach(), rtol=0, atol=1e-4)


def test_adjoint_gradients_match_backprop():
    x = _mixture(32, torch.Generator().manual_seed(9))
    grads = []
    for adjoint in (False, True):
        torch.manual_seed(10)
        model = CNF.from_spec({"hidden_dims": [16, 16], "num_blocks": 2, "kinetic_energy": 0.1,
                               "jacobian_norm": 0.1}, {"rtol": 1e-9, "atol": 1e-9, "adjoint": adjoint}, 2).to(D64)
        loss = -model.log_prob(x).mean() + sum(model.regularization().values())
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_planar_vector_field_cnf_integrates_to_one():
    torch.manual_seed(11)
    model = CNF.from_spec({"vector_field": "planar", "planar_width": 8, "hidden_dims": [16]}, GRID_TOL, 2).to(D64)
    pts, h = _grid()
    with torch.no_grad():
        assert model.log_prob(pts).exp().sum().item() * h * h == pytest.approx(1.0, abs=0.01)


def test_from_spec_defaults_and_errors():
    model = CNF.from_spec({"type": "cnf"}, None, 2)
    assert [layer.linear.out_features for layer in model.blocks[0].field.layers] == [64, 64, 64, 2]
    assert len(model.blocks) == 1 and model.trace_estimator == "exact"
    assert model.blocks[0].end_time.item() == pytest.approx(1.0)
    assert model.blocks[0].raw_end_time.requires_grad
    assert model.solver.method == "dopri5" and model.solver.adjoint and model.regularization() == {}
    fixed = CNF.from_spec({"end_time": 0.5, "train_end_time": False}, {"rtol": 1e-3}, 2)
    assert fixed.blocks[0].end_time.item() == pytest.approx(0.5)
    assert not fixed.blocks[0].raw_end_time.requires_grad
    fixed.set_tolerances(1e-7, 1e-9)
    assert (fixed.solver.rtol, fixed.solver.atol) == (1e-7, 1e-9)
    for bad, match in [({"vector_field": "radial"}, "vector_field"), ({"nonlinearity": "relu"}, "nonlinearity"),
                       ({"trace_estimator": "skilling"}, "trace_estimator"), ({"noise": "uniform"}, "noise"),
                       ({"end_time": 0.0}, "end_time"), ({"num_blocks": 0}, "num_blocks"),
                       ({"kinetic_energy": -1.0}, "kinetic_energy")]:
        with pytest.raises(ValueError, match=match):
            CNF.from_spec(bad, None, 2)
    with pytest.raises(ValueError, match="rtol"):
        CNF.from_spec({}, {"rtol": 0.0}, 2)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        model.log_prob(torch.zeros(3, 5))
