"""CNF machinery with a linear field f(z) = Az, where everything has a closed form.

Generative flow dz/dt = Az on [0, T]: x = e^{AT} z(0), so
    log p(x) = log N(e^{-AT} x; 0, I) - T tr(A)                         (Chen et al. 2018, eq. 4)
    d log p / dT = zᵀ A z - tr(A),  z = e^{-AT} x
    kinetic energy ∫_0^T ‖A z(t)‖² dt = ∫_0^T ‖A e^{-Aτ} x‖² dτ         (Finlay et al. 2020)
    Jacobian norm  ∫_0^T ‖A‖_F² dt = T ‖A‖_F²
References come from scipy (expm, quad_vec), never from the code under test.
"""

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch
from torch import nn

from node_engine.models.cnf import CNF
from node_engine.specs import SolverSection
from node_engine.models.regularizers import RNODEWeights

D64 = torch.float64
A1 = np.array([[0.3, -0.5], [0.8, -0.2]])
A2 = np.array([[-0.4, 0.9], [0.1, 0.25]])


class LinearField(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.register_buffer("a", torch.tensor(a, dtype=D64))

    def forward(self, t, z):
        return z @ self.a.T


def _gauss_logpdf(z):
    return -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def _points(n=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 2)) * 1.5


def _cnf(mats, T, *, adjoint=False, train_end_time=False, reg=RNODEWeights(), estimator="exact", tol=1e-10):
    solver = SolverSection(rtol=tol, atol=tol, adjoint=adjoint)
    return CNF([LinearField(a) for a in mats], 2, end_time=T, train_end_time=train_end_time,
               trace_estimator=estimator, regularization=reg, solver=solver).to(D64)


@pytest.mark.parametrize("adjoint", [False, True])
def test_linear_log_density_closed_form(adjoint):
    T, x = 0.7, _points()
    model = _cnf([A1], T, adjoint=adjoint)
    got = model.log_prob(torch.tensor(x)).detach().numpy()
    z = x @ scipy.linalg.expm(-A1 * T).T
    np.testing.assert_allclose(got, _gauss_logpdf(z) - T * np.trace(A1), rtol=0, atol=1e-8)
    assert model.stats.nfe_forward > 0


def test_stacked_blocks_apply_in_order():
    # block 0 acts first on base samples: x = e^{A2 T} e^{A1 T} z(0)
    T, x = 0.6, _points(seed=1)
    model = _cnf([A1, A2], T)
    got = model.log_prob(torch.tensor(x)).detach().numpy()
    z = x @ (scipy.linalg.expm(-A1 * T) @ scipy.linalg.expm(-A2 * T)).T
    np.testing.assert_allclose(got, _gauss_logpdf(z) - T * (np.trace(A1) + np.trace(A2)), atol=1e-8)
    # and the generative map is the matrix exponential product
    z0 = torch.tensor(_points(seed=2))
    expected = z0.numpy() @ (scipy.linalg.expm(A2 * T) @ scipy.linalg.expm(A1 * T)).T
    np.testing.assert_allclose(model.from_base(z0).numpy(), expected, atol=1e-8)


@pytest.mark.parametrize("adjoint", [False, True])
def test_end_time_gradient_closed_form(adjoint):
    T, x = 0.8, _points(seed=3)
    model = _cnf([A1], T, adjoint=adjoint, train_end_time=True)
    model.log_prob(torch.tensor(x)).sum().backward()
    z = x @ scipy.linalg.expm(-A1 * T).T
    dlogp_dT = np.einsum("ni,ij,nj->n", z, A1, z) - np.trace(A1)
    theta = model.blocks[0].raw_end_time.detach()
    expected = dlogp_dT.sum() * torch.sigmoid(theta).item()  # T = softplus(θ)
    assert model.blocks[0].raw_end_time.grad.item() == pytest.approx(expected, rel=1e-6)


def test_kinetic_energy_and_jacobian_norm_closed_form():
    T, x = 0.9, _points(n=5, seed=4)
    weights = RNODEWeights(kinetic_energy=0.5, jacobian_norm=2.0)
    model = _cnf([A1], T, reg=weights).train()
    logp = model.log_prob(torch.tensor(x))
    regs = model.regularization()
    ke = scipy.integrate.quad_vec(
        lambda tau: ((x @ scipy.linalg.expm(-A1 * tau).T @ A1.T) ** 2).sum(1), 0, T, epsabs=1e-13, epsrel=1e-12
    )[0]
    assert regs["kinetic_energy"].item() == pytest.approx(0.5 * ke.mean(), rel=1e-7)
    assert regs["jacobian_norm"].item() == pytest.approx(2.0 * T * (A1**2).sum(), rel=1e-7)
    z = x @ scipy.linalg.expm(-A1 * T).T
    np.testing.assert_allclose(logp.detach().numpy(), _gauss_logpdf(z) - T * np.trace(A1), atol=1e-8)


def test_hutchinson_jacobian_norm_is_unbiased():
    # Rademacher ε: E‖εᵀA‖² = ‖A‖_F². One solve, many rows, each its own ε (fixed along the path).
    T, n = 0.5, 4000
    x = np.repeat(_points(n=1, seed=5), n, axis=0)
    model = _cnf([A1], T, reg=RNODEWeights(jacobian_norm=1.0), estimator="hutchinson", tol=1e-8).train()
    torch.manual_seed(0)
    model.log_prob(torch.tensor(x))
    # per-row values are T‖εᵀA‖², so the batch mean has standard error sd/√n
    eps = np.array([[a, b] for a in (-1, 1) for b in (-1, 1)])
    per_eps = T * ((eps @ A1) ** 2).sum(1)
    mean, sd = per_eps.mean(), per_eps.std()
    assert mean == pytest.approx(T * (A1**2).sum(), rel=1e-12)  # sanity of the reference itself
    assert abs(model.regularization()["jacobian_norm"].item() - mean) < 5 * sd / math.sqrt(n)


def test_regularizer_channels_do_not_change_step_sizes():
    # RNODE channels are excluded from error control: same steps, hence same NFE, with or without them
    x = torch.tensor(_points(n=50, seed=6))
    plain = _cnf([A1], 1.3, tol=1e-6)
    plain.log_prob(x)
    regularized = _cnf([A1], 1.3, tol=1e-6, reg=RNODEWeights(kinetic_energy=1.0, jacobian_norm=1.0)).train()
    regularized.log_prob(x)
    assert regularized.regularization()
    assert regularized.stats.nfe_forward == plain.stats.nfe_forward
