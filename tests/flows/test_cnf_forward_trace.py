"""The forward-mode exact trace of ConcatSquash fields (``ConcatSquashField.jacobian_trace``).

References are independent of the code under test: the full Jacobian of one sample from
``torch.autograd.functional.jacobian`` (trace and squared Frobenius norm), and the generic autograd
path of the CNF (D vector-Jacobian products, ``divergence_exact``) for gradients. Everything in
float64, so agreement is to round-off.
"""

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from node_engine.models.cnf import CNF
from node_engine.models.cnf_divergence import divergence_exact
from node_engine.models.cnf_fields import ConcatSquashField, tangents_backward

D64 = torch.float64


def _field(dim, hidden, nonlinearity, seed, scale=3.0):
    torch.manual_seed(seed)
    field = ConcatSquashField(dim, hidden, nonlinearity).to(D64)
    with torch.no_grad():  # default init is nearly linear; larger weights make σ'' matter
        for p in field.parameters():
            p.mul_(scale)
    return field


def _times(kind, n, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "scalar":
        return torch.rand((), generator=gen, dtype=D64)
    return torch.rand(n, generator=gen, dtype=D64)  # per-sample times (step_control="per_sample")


@pytest.fixture(params=[True, False], ids=["fused", "autograd-ops"])
def fused(request):
    before = ConcatSquashField.fused_tangents
    ConcatSquashField.fused_tangents = request.param
    yield request.param
    ConcatSquashField.fused_tangents = before


@pytest.mark.parametrize("nonlinearity", ["tanh", "softplus"])
@pytest.mark.parametrize("time_kind", ["scalar", "per_sample"])
@pytest.mark.parametrize("dim,hidden", [(2, (16, 16, 16)), (3, (8,)), (1, (5, 7))])
def test_trace_and_frobenius_equal_the_full_jacobian(fused, nonlinearity, time_kind, dim, hidden):
    field = _field(dim, hidden, nonlinearity, seed=dim)
    n = 6
    z = 1.5 * torch.randn(n, dim, dtype=D64, generator=torch.Generator().manual_seed(7))
    t = _times(time_kind, n, 8)
    with torch.no_grad():
        f, div, frob = field.jacobian_trace(t, z, frobenius=True)
    assert f.shape == (n, dim) and div.shape == (n,) and frob.shape == (n,)
    for k in range(n):
        tk = t if t.dim() == 0 else t[k]
        jac = jacobian(lambda v: field(tk, v[None])[0], z[k])
        assert torch.allclose(f[k], field(tk, z[k : k + 1])[0], rtol=0, atol=1e-13)
        assert div[k].item() == pytest.approx(torch.trace(jac).item(), rel=1e-12, abs=1e-13)
        assert frob[k].item() == pytest.approx(jac.pow(2).sum().item(), rel=1e-12, abs=1e-13)
    assert div.abs().max() > 1e-3 and frob.max() > 1e-4  # a non-trivial field: the check can fail


def test_softplus_above_its_threshold_matches_autograd(fused):
    """nn.Softplus is linear (σ' = 1 exactly) above 20: pre-activations that large must agree too."""
    field = _field(2, (16, 16), "softplus", seed=3, scale=6.0)
    z = 30.0 * torch.randn(5, 2, dtype=D64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(0.7, dtype=D64)
    with torch.no_grad():
        pre = field.layers[0](t, z)
    assert (pre > 20).any() and (pre < 20).any()
    zz = z.clone().requires_grad_(True)
    params = list(field.parameters())
    f, div, frob = field.jacobian_trace(t, zz, frobenius=True)
    f_ref = field(t, zz)
    div_ref, frob_ref = divergence_exact(f_ref, zz, create_graph=True)
    assert torch.allclose(div, div_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(frob, frob_ref, rtol=1e-12, atol=1e-12)
    # (the last layer's time shift b·t does not enter the Jacobian: its gradient is absent/zero)
    g = torch.autograd.grad((div.sum() + frob.sum()), [zz, *params], allow_unused=True)
    g_ref = torch.autograd.grad((div_ref.sum() + frob_ref.sum()), [zz, *params], allow_unused=True)
    for a, b, p in zip(g, g_ref, [zz, *params]):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("nonlinearity", ["tanh", "softplus"])
@pytest.mark.parametrize("time_kind", ["scalar", "per_sample"])
def test_gradients_equal_the_autograd_double_backward(fused, nonlinearity, time_kind):
    """d/d(z, t, θ) of a random combination of f, tr J and ‖J‖_F² — what the adjoint's VJP takes."""
    field = _field(2, (16, 16, 16), nonlinearity, seed=11)
    n = 9
    gen = torch.Generator().manual_seed(12)
    z = torch.randn(n, 2, dtype=D64, generator=gen).requires_grad_(True)
    t = _times(time_kind, n, 13).requires_grad_(True)
    w_f, w_div, w_frob = (torch.randn(s, dtype=D64, generator=gen) for s in ((n, 2), (n,), (n,)))
    params = list(field.parameters())

    f, div, frob = field.jacobian_trace(t, z, frobenius=True)
    grads = torch.autograd.grad((w_f * f).sum() + (w_div * div).sum() + (w_frob * frob).sum(), [z, t, *params])

    f_ref = field(t, z)
    div_ref, frob_ref = divergence_exact(f_ref, z, create_graph=True)
    loss_ref = (w_f * f_ref).sum() + (w_div * div_ref).sum() + (w_frob * frob_ref).sum()
    grads_ref = torch.autograd.grad(loss_ref, [z, t, *params])
    for g, g_ref in zip(grads, grads_ref):
        assert g_ref.abs().max() > 0
        assert torch.allclose(g, g_ref, rtol=1e-11, atol=1e-12)


def test_without_frobenius_returns_none_and_same_trace():
    field = _field(2, (8, 8), "tanh", seed=0)
    z = torch.randn(4, 2, dtype=D64)
    t = torch.tensor(0.2, dtype=D64)
    f, div, frob = field.jacobian_trace(t, z)
    f2, div2, _ = field.jacobian_trace(t, z, frobenius=True)
    assert frob is None
    assert torch.equal(f, f2) and torch.equal(div, div2)


class _AutogradOnly(nn.Module):
    """The same field without ``jacobian_trace``: the CNF falls back to D autograd VJPs."""

    def __init__(self, field):
        super().__init__()
        self.inner = field

    def forward(self, t, z):
        return self.inner(t, z)


@pytest.mark.parametrize("rnode", [True, False], ids=["rnode", "plain"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "softplus"])
def test_cnf_log_prob_and_adjoint_gradients_match_the_autograd_path(nonlinearity, rnode, monkeypatch):
    """Whole flow through the backsolve adjoint: forward-mode trace and the generic autograd trace
    give the same log-densities, regularizers and parameter gradients, with and without both RNODE
    terms. The fused dynamics supply the adjoint's VJP themselves (``adjoint_vjp``, no autograd
    graph per evaluation), checked here to be the path taken."""
    import node_engine.models.cnf as cnf_module

    direct_calls = []

    def counting_backward(*args):
        direct_calls.append(1)
        return tangents_backward(*args)

    monkeypatch.setattr(cnf_module, "tangents_backward", counting_backward)
    spec = {"type": "cnf", "hidden_dims": [16, 16], "nonlinearity": nonlinearity, "num_blocks": 2,
            "kinetic_energy": 0.1 if rnode else 0.0, "jacobian_norm": 0.1 if rnode else 0.0}
    solver = {"rtol": 1e-8, "atol": 1e-8, "adjoint": True}
    torch.manual_seed(4)
    fast = CNF.from_spec(spec, solver, 2).to(D64)
    with torch.no_grad():
        for p in fast.parameters():
            p.mul_(1.5)
    slow = CNF([_AutogradOnly(b.field) for b in fast.blocks], 2, regularization=fast.regularization_weights,
               solver=fast.solver).to(D64)
    slow.load_state_dict({k.replace(".field.", ".field.inner."): v for k, v in fast.state_dict().items()})
    assert not hasattr(slow.blocks[0].field, "jacobian_trace")
    x = torch.randn(32, 2, dtype=D64, generator=torch.Generator().manual_seed(5))
    results = []
    for model in (fast, slow):
        model.train()
        logp = model.log_prob(x)
        reg = model.regularization()
        loss = -logp.mean() + sum(reg.values())
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((logp.detach(), {k: v.detach() for k, v in reg.items()}, grads,
                        model.stats.nfe_forward, model.stats.nfe_backward))
    (lp_a, reg_a, g_a, nf_a, nb_a), (lp_b, reg_b, g_b, nf_b, nb_b) = results
    assert (nf_a, nb_a) == (nf_b, nb_b)  # same step sequence
    assert len(direct_calls) == nb_a  # the adjoint's VJP came from the fused dynamics, not autograd
    assert torch.allclose(lp_a, lp_b, rtol=1e-10, atol=1e-10)
    for name in (("kinetic_energy", "jacobian_norm") if rnode else ()):
        assert reg_a[name].item() == pytest.approx(reg_b[name].item(), rel=1e-10)
    for a, b in zip(g_a, g_b):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    assert max(g.abs().max().item() for g in g_a) > 0


def test_sampling_log_density_gradients_match_the_autograd_path():
    """The generative direction (samples and their log-density, t = T s) through the adjoint's
    direct VJP equals the generic autograd path."""
    spec = {"type": "cnf", "hidden_dims": [16, 16], "nonlinearity": "tanh", "num_blocks": 2}
    torch.manual_seed(6)
    fast = CNF.from_spec(spec, {"rtol": 1e-8, "atol": 1e-8, "adjoint": True}, 2).to(D64)
    slow = CNF([_AutogradOnly(b.field) for b in fast.blocks], 2, solver=fast.solver).to(D64)
    slow.load_state_dict({k.replace(".field.", ".field.inner."): v for k, v in fast.state_dict().items()})
    results = []
    for model in (fast, slow):
        x, logp = model.sample_and_log_prob(16, generator=torch.Generator().manual_seed(7))
        loss = logp.mean() + (x ** 2).mean()
        results.append((x.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    (x_a, g_a), (x_b, g_b) = results
    assert torch.allclose(x_a, x_b, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_a, g_b):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    assert max(g.abs().max().item() for g in g_a) > 0
