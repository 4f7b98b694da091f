"""Gradients: backprop through odeint, odeint_adjoint (backsolve, checkpoint) and finite
differences agree; checkpoint is right where backsolve fails; seminorm saves backward NFE;
tuple states; Hamiltonian fields using autograd.grad; t gradients; O(1) memory of backsolve."""

import math

import pytest
import torch
from torch import nn

from node_engine import SolverStats, odeint, odeint_adjoint

from .problems import MLPField

f64 = torch.float64
MODES = ["backsolve", "checkpoint"]


def _loss(out, w):
    return (out * w).sum()  # a loss term at every output time


def _grads(solver, field, y0, t, w, **kw):
    y0 = y0.detach().requires_grad_(True)
    out = solver(field, y0, t, **kw)
    params = list(field.parameters())
    gs = torch.autograd.grad(_loss(out, w), [y0] + params)
    return torch.cat([g.reshape(-1) for g in gs])


def _fd(field, y0, t, w, eps=1e-5, **kw):
    """Central differences of the loss, solved with DOP853 at 1e-12 (≈ the continuous gradient)."""
    kw = dict(rtol=1e-12, atol=1e-12, method="dopri8")
    params = list(field.parameters())
    leaves = [y0] + params
    out = []
    with torch.no_grad():
        for leaf in leaves:
            flat = leaf.view(-1)
            for i in range(flat.numel()):
                old = float(flat[i])
                flat[i] = old + eps
                lp = float(_loss(odeint(field, y0, t, **kw), w))
                flat[i] = old - eps
                lm = float(_loss(odeint(field, y0, t, **kw), w))
                flat[i] = old
                out.append((lp - lm) / (2 * eps))
    return torch.tensor(out, dtype=f64)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def mlp_case():
    field = MLPField(dim=2, hidden=6)
    y0 = torch.tensor([[0.5, -0.3], [1.0, 0.2]], dtype=f64)
    t = torch.tensor([0.0, 0.4, 1.0, 1.5], dtype=f64)
    w = torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(1), dtype=f64)
    return field, y0, t, w, _fd(field, y0.clone(), t, w)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "tsit5", "dopri8", "rk4"])
def test_backprop_adjoint_and_finite_differences_agree(method, mlp_case):
    field, y0, t, w, g_fd = mlp_case
    tol = 1e-8 if method == "bosh3" else 1e-9
    kw = dict(rtol=tol, atol=tol, method=method, options=dict(step_size=0.02) if method == "rk4" else None)
    g_bp = _grads(odeint, field, y0, t, w, **kw)
    assert _rel(g_bp, g_fd) < 1e-5
    g_ck = _grads(odeint_adjoint, field, y0, t, w, adjoint_mode="checkpoint", **kw)
    # checkpoint = exact gradient of the discrete solve = backprop through it
    assert torch.allclose(g_ck, g_bp, rtol=1e-9, atol=1e-12)
    g_bs = _grads(odeint_adjoint, field, y0, t, w, adjoint_mode="backsolve", **kw)
    assert _rel(g_bs, g_fd) < 1e-5


def test_checkpoint_right_where_backsolve_fails():
    """y1' = -k y1 (fast decay), y2' = θ y1, L = y2(T): dL/dθ = y1(0)(1 - e^{-kT})/k.

    Backsolve re-integrates y1 backwards from y1(T) ≈ e^{-kT}: any forward error there grows
    like e^{kT} (1e17 here), whatever the tolerance. Checkpoint replays the forward steps."""
    k, T = 40.0, 1.0
    theta = torch.tensor(1.0, dtype=f64, requires_grad=True)

    def f(t, y):
        return torch.stack([-k * y[0], theta * y[0]])

    y0 = torch.tensor([1.0, 0.0], dtype=f64)
    t = torch.tensor([0.0, T], dtype=f64)
    exact = (1 - math.exp(-k * T)) / k
    errs = {}
    for mode in MODES:
        out = odeint_adjoint(f, y0, t, rtol=1e-8, atol=1e-8, adjoint_params=(theta,), adjoint_mode=mode)
        (g,) = torch.autograd.grad(out[-1, 1], theta)
        errs[mode] = abs(float(g) - exact) / exact
    assert errs["checkpoint"] < 1e-5
    assert errs["backsolve"] > 1.0  # off by orders of magnitude


def test_seminorm_cuts_backward_nfe_with_equal_gradients():
    field = MLPField(dim=2, hidden=32, seed=3)
    y0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=f64)
    t = torch.tensor([0.0, 1.0], dtype=f64)
    w = torch.randn(2, 64, 2, generator=torch.Generator().manual_seed(2), dtype=f64)
    grads, nfe = {}, {}
    for norm in ["default", "seminorm"]:
        s = SolverStats()
        grads[norm] = _grads(odeint_adjoint, field, y0, t, w, rtol=1e-6, atol=1e-6, stats=s,
                             adjoint_options=dict(norm=norm))
        nfe[norm] = s.nfe_backward
    assert nfe["seminorm"] < nfe["default"]
    g_ck = _grads(odeint_adjoint, field, y0, t, w, rtol=1e-6, atol=1e-6, adjoint_mode="checkpoint")
    rel = lambda a, b: float((a - b).norm() / b.norm())
    assert rel(grads["seminorm"], g_ck) < 1e-4 and rel(grads["default"], g_ck) < 1e-4


def test_backsolve_starts_with_the_forward_step_and_keeps_the_gradient(mlp_case):
    """The backward solve's first step is the forward controller's last proposal (not Hairer's
    initial step): fewer backward evaluations, the same accuracy against finite differences."""
    field, y0, t, w, g_fd = mlp_case
    nfe, err = {}, {}
    for name, opts in [("warm", None), ("hairer", dict(first_step=None))]:
        s = SolverStats()
        g = _grads(odeint_adjoint, field, y0, t, w, rtol=1e-7, atol=1e-7, stats=s, adjoint_options=opts)
        nfe[name], err[name] = s.nfe_backward, _rel(g, g_fd)
    assert nfe["warm"] < nfe["hairer"], nfe
    assert err["warm"] < 1e-5 and err["hairer"] < 1e-5, err


def test_per_component_adjoint_tolerances(mlp_case):
    """Tensor adjoint_rtol/atol (one per state component) are accepted and honoured."""
    field, y0, t, w, g_fd = mlp_case
    tol = torch.full(y0.shape, 1e-8, dtype=f64)
    g = _grads(odeint_adjoint, field, y0, t, w, rtol=1e-8, atol=1e-8, adjoint_rtol=tol, adjoint_atol=tol)
    assert _rel(g, g_fd) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_tuple_state_adjoint(mode):
    omega = torch.tensor(1.3, dtype=f64, requires_grad=True)

    def f(t, s):
        q, p = s
        return p, -omega**2 * q

    q0 = torch.tensor([1.0, 0.5], dtype=f64, requires_grad=True)
    p0 = torch.tensor([0.0, -0.2], dtype=f64, requires_grad=True)
    t = torch.tensor([0.0, 0.7, 2.0], dtype=f64)

    def loss(solver, **kw):
        q, p = solver(f, (q0, p0), t, rtol=1e-10, atol=1e-10, **kw)
        return (q**2).sum() + (p[-1] * torch.tensor([1.0, 2.0], dtype=f64)).sum()

    g_ref = torch.autograd.grad(loss(odeint), (q0, p0, omega))
    g = torch.autograd.grad(loss(odeint_adjoint, adjoint_params=(omega,), adjoint_mode=mode), (q0, p0, omega))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)
    # analytic check of one entry: q(t) = q0 cos ωt + p0/ω sin ωt
    tt = t[:, None]
    with torch.no_grad():
        q_exact = q0 * torch.cos(omega * tt) + p0 / omega * torch.sin(omega * tt)
        q_num, _ = odeint(f, (q0, p0), t, rtol=1e-10, atol=1e-10)
        assert torch.allclose(q_num, q_exact, atol=1e-8)


class Hamiltonian(nn.Module):
    """H(q, p) = p²/2 + a (1 - cos q): dynamics from autograd.grad inside the field."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(2.0, dtype=f64))

    def forward(self, t, y):
        with torch.enable_grad():
            y = y if y.requires_grad else y.detach().requires_grad_(True)
            q, p = y[..., 0], y[..., 1]
            H = (0.5 * p**2 + self.a * (1 - torch.cos(q))).sum()
            dH = torch.autograd.grad(H, y, create_graph=True)[0]
        return torch.stack([dH[..., 1], -dH[..., 0]], -1)


@pytest.mark.parametrize("solver", ["odeint", "backsolve", "checkpoint"])
def test_hamiltonian_field_with_autograd_grad(solver):
    field = Hamiltonian()
    y0 = torch.tensor([[1.0, 0.0], [0.3, 0.5]], dtype=f64)
    t = torch.tensor([0.0, 0.5, 1.2], dtype=f64)
    w = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(4), dtype=f64)
    kw = dict(rtol=1e-10, atol=1e-10)
    if solver == "odeint":
        g = _grads(odeint, field, y0, t, w, **kw)
    else:
        g = _grads(odeint_adjoint, field, y0, t, w, adjoint_mode=solver, **kw)
    g_fd = _fd(field, y0.clone(), t, w)
    assert _rel(g, g_fd) < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_time_gradient(mode):
    field = MLPField(dim=2, hidden=5, seed=5)
    y0 = torch.tensor([0.4, -0.2], dtype=f64)
    t = torch.tensor([0.1, 0.6, 1.3], dtype=f64, requires_grad=True)
    w = torch.tensor([[0.0, 0.0], [1.0, -0.5], [0.3, 2.0]], dtype=f64)
    out = odeint_adjoint(field, y0, t, rtol=1e-10, atol=1e-10, adjoint_mode=mode)
    (g,) = torch.autograd.grad(_loss(out, w), t)
    eps = 1e-6
    fd = []
    with torch.no_grad():
        for i in range(3):
            tp, tm = t.detach().clone(), t.detach().clone()
            tp[i] += eps
            tm[i] -= eps
            fd.append((float(_loss(odeint(field, y0, tp, rtol=1e-11, atol=1e-11), w))
                       - float(_loss(odeint(field, y0, tm, rtol=1e-11, atol=1e-11), w))) / (2 * eps))
    assert torch.allclose(g, torch.tensor(fd, dtype=f64), rtol=1e-5, atol=1e-6)


def test_backward_nfe_is_counted():
    field = MLPField()
    y0 = torch.randn(8, 2, dtype=f64, requires_grad=True)
    for mode in MODES:
        s = SolverStats()
        out = odeint_adjoint(field, y0, torch.tensor([0.0, 1.0], dtype=f64), adjoint_mode=mode, stats=s)
        assert s.nfe_backward == 0 and s.nfe_forward > 0
        out.sum().backward()
        assert s.nfe_backward > 0


def _saved_bytes(fn):
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return total[0]


def test_backsolve_memory_is_constant_in_steps():
    field = MLPField(dim=2, hidden=32)
    y0 = torch.randn(128, 2, dtype=f64, requires_grad=True)
    t = torch.tensor([0.0, 2.0], dtype=f64)
    out_bytes, steps = {}, {}
    tols = [1e-3, 1e-7]
    for rtol in tols:
        s = SolverStats()
        out_bytes[rtol] = _saved_bytes(
            lambda: odeint_adjoint(field, y0, t, rtol=rtol, atol=rtol, method="bosh3", stats=s).sum())
        steps[rtol] = s.steps_accepted
    assert steps[tols[1]] >= 10 * steps[tols[0]]
    assert out_bytes[tols[1]] == out_bytes[tols[0]] > 0
    # whereas backprop through the solver and the checkpoint mode grow with the steps
    grow = {}
    for rtol in tols:
        grow[rtol] = _saved_bytes(lambda: odeint_adjoint(
            field, y0, t, rtol=rtol, atol=rtol, method="bosh3", adjoint_mode="checkpoint").sum())
    assert grow[tols[1]] > 5 * grow[tols[0]]


@pytest.mark.parametrize("mode", MODES)
def test_adjoint_backwards_in_time_and_jump(mode):
    field = MLPField(dim=2, hidden=5, seed=7)
    y0 = torch.tensor([[0.3, -0.4]], dtype=f64)
    t = torch.tensor([1.5, 0.9, 0.0], dtype=f64)
    w = torch.randn(3, 1, 2, generator=torch.Generator().manual_seed(8), dtype=f64)
    kw = dict(rtol=1e-9, atol=1e-9, options=dict(jump_t=[0.5], step_t=[1.2]))
    g_bp = _grads(odeint, field, y0, t, w, **kw)
    g = _grads(odeint_adjoint, field, y0, t, w, adjoint_mode=mode, **kw)
    tol = 1e-9 if mode == "checkpoint" else 1e-6
    assert _rel(g, g_bp) < tol


@pytest.mark.parametrize("mode", MODES)
def test_single_output_time_gradient_is_identity(mode):
    # With t = [t0] the solution is y0 itself, so d(sum(w * out))/dy0 = w exactly, and no parameter
    # gradient flows. (A single-time call once added g_out[0] twice in backsolve mode.)
    field = MLPField()
    y0 = torch.tensor([0.3, -0.7], dtype=f64, requires_grad=True)
    w = torch.tensor([[1.5, -2.0]], dtype=f64)
    out = odeint_adjoint(field, y0, torch.tensor([0.0], dtype=f64), adjoint_mode=mode)
    (g,) = torch.autograd.grad((out * w).sum(), [y0])
    assert torch.equal(g, w[0])


@pytest.mark.parametrize("adjoint", [False, True])
def test_tuple_of_scalars_harmonic_oscillator(adjoint):
    # (x, v) as two 0-d tensors, as torchdiffeq allows: x'' = -x, so x(t) = cos t, v(t) = -sin t,
    # and d x(t1)/d x0 = cos t1 analytically.
    x0 = torch.tensor(1.0, dtype=f64, requires_grad=True)
    v0 = torch.tensor(0.0, dtype=f64)
    t = torch.tensor([0.0, 1.0], dtype=f64)
    solve = odeint_adjoint if adjoint else odeint
    kw = dict(adjoint_params=()) if adjoint else {}
    x, v = solve(lambda t, s: (s[1], -s[0]), (x0, v0), t, rtol=1e-10, atol=1e-12, **kw)
    assert x.shape == (2,) and v.shape == (2,)
    assert abs(x[-1].item() - math.cos(1.0)) < 1e-8 and abs(v[-1].item() + math.sin(1.0)) < 1e-8
    (g,) = torch.autograd.grad(x[-1], [x0])
    assert abs(g.item() - math.cos(1.0)) < 1e-7
