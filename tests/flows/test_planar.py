"""Discrete planar flow (Rezende & Mohamed 2015) and the planar CNF field (Chen et al. 2018 §4),
checked against autograd Jacobians and direct numerical integration."""

import math

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from node_engine.models.cnf_fields import PlanarField
from node_engine.models.planar import PlanarFlow, PlanarLayer

D64 = torch.float64


def _layer(dim, seed, scale=2.0):
    torch.manual_seed(seed)
    layer = PlanarLayer(dim).to(D64)
    with torch.no_grad():
        layer.u.normal_(0, scale)
        layer.w.normal_(0, scale)
        layer.b.normal_(0, 1.0)
    return layer


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planar_logdet_equals_jacobian_determinant(seed):
    layer = _layer(3, seed)
    z = torch.randn(6, 3, dtype=D64, generator=torch.Generator().manual_seed(seed))
    _, logdet = layer(z)
    for n in range(z.shape[0]):
        jac = jacobian(lambda v: layer(v[None])[0][0], z[n])
        assert logdet[n].item() == pytest.approx(math.log(abs(torch.linalg.det(jac).item())), abs=1e-12)


def test_u_hat_keeps_layer_invertible():
    layer = _layer(2, 0)
    with torch.no_grad():  # u anti-parallel to w: without the constraint det(1 + h' uᵀw) can be 0
        layer.u.copy_(-3.0 * layer.w / (layer.w @ layer.w))
    assert (layer.u_hat() @ layer.w).item() > -1.0
    z = torch.randn(500, 2, dtype=D64)
    y, logdet = layer(z)
    assert torch.isfinite(logdet).all()
    torch.testing.assert_close(layer.inverse(y), z, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 3])
def test_planar_inverse_round_trip(seed):
    torch.manual_seed(seed)
    flow = PlanarFlow(2, num_layers=16).to(D64)
    x = torch.randn(300, 2, dtype=D64) * 3
    z = flow.to_base(x)
    torch.testing.assert_close(flow.from_base(z)[0], x, rtol=0, atol=1e-10)


def test_planar_log_prob_consistent_and_differentiable():
    torch.manual_seed(0)
    flow = PlanarFlow.from_spec({"type": "planar", "num_layers": 8}, None, 2).to(D64)
    x, log_q = flow.sample_and_log_prob(64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(flow.log_prob(x.detach()), log_q.detach(), rtol=0, atol=1e-10)
    # The inverse is differentiable: d log p(x)/dθ by autograd matches a central difference.
    p = flow.layers[3].u
    x0 = x.detach()[:5]
    flow.zero_grad()
    flow.log_prob(x0).sum().backward()
    grad = p.grad[0].item()
    h = 1e-6
    with torch.no_grad():
        p[0] += h
        up = flow.log_prob(x0).sum().item()
        p[0] -= 2 * h
        down = flow.log_prob(x0).sum().item()
        p[0] += h
    assert grad == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-8)


def test_planar_flow_density_integrates_to_one():
    torch.manual_seed(5)
    flow = PlanarFlow(2, num_layers=8).to(D64)
    grid = torch.linspace(-8, 8, 241, dtype=D64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    with torch.no_grad():
        mass = flow.log_prob(pts).exp().sum().item() * (grid[1] - grid[0]).item() ** 2
    assert mass == pytest.approx(1.0, abs=0.01)


def test_planar_from_spec_defaults_and_errors():
    assert len(PlanarFlow.from_spec({"type": "planar"}, {}, 2).layers) == 8
    with pytest.raises(ValueError, match="num_layers"):
        PlanarFlow.from_spec({"type": "planar", "num_layers": 0}, None, 2)
    flow = PlanarFlow(2, 2)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        flow.log_prob(torch.zeros(4, 3))
    assert flow.regularization() == {}


def _check_against_autograd(field, t, z):
    """analytic_divergence at (t, z) against autograd Jacobians row by row; t 0-dim or (N,). Returns it."""
    f, div, frob = field.analytic_divergence(t, z)
    torch.testing.assert_close(f, field(t, z))
    for n in range(z.shape[0]):
        t_n = t if t.dim() == 0 else t[n]
        jac = jacobian(lambda v: field(t_n, v[None])[0], z[n])
        assert div[n].item() == pytest.approx(torch.trace(jac).item(), abs=1e-12)
        assert frob[n].item() == pytest.approx(jac.pow(2).sum().item(), abs=1e-12)
    return f, div, frob


@pytest.mark.parametrize("seed", [0, 1])
def test_planar_field_analytic_trace_matches_autograd(seed):
    torch.manual_seed(seed)
    field = PlanarField(3, width=8, hidden_dims=(16,)).to(D64)
    z = torch.randn(5, 3, dtype=D64)
    t = torch.tensor(0.37, dtype=D64)
    f, div, frob = _check_against_autograd(field, t, z)
    # dz/dt = Σ_m u_m tanh(w_mᵀz + b_m) written out independently of the module's algebra
    w, u, b = field.parameters_at(t, z)
    explicit = sum(np.outer(np.tanh(z.numpy() @ w[m].detach().numpy() + b[m].item()), u[m].detach().numpy())
                   for m in range(8))
    np.testing.assert_allclose(f.detach().numpy(), explicit, atol=1e-12)


def test_planar_field_takes_one_time_per_row():
    # per-sample stepping calls the field with t of shape (N,): row n must be the field at t[n]
    torch.manual_seed(2)
    field = PlanarField(3, width=8, hidden_dims=(16,)).to(D64)
    z = torch.randn(6, 3, dtype=D64)
    t = torch.rand(6, dtype=D64)
    f, _, _ = _check_against_autograd(field, t, z)
    for n in range(z.shape[0]):  # the scalar-time path, one row at a time
        torch.testing.assert_close(f[n], field(t[n], z[n:n + 1])[0], rtol=1e-13, atol=1e-13)
