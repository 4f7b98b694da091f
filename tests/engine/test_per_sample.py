"""step_control="per_sample": every batch row its own step size. References come from scipy
(DOP853 at 1e-12) or closed forms, never from node_engine; batch-independence is checked by
solving each sample alone."""

import math

import numpy as np
import pytest
import scipy.integrate
import torch

from node_engine import SolverStats, odeint, odeint_adjoint
from node_engine.errors import MaxNumStepsError

from .problems import ADAPTIVE_METHODS

f64 = torch.float64
PS = dict(step_control="per_sample")


def vdp_rows(t, state):
    """Van der Pol with a per-sample μ carried in the state (dμ/dt = 0), so rows stay independent."""
    y, mu = state
    x, v = y[:, 0], y[:, 1]
    return torch.stack([v, mu * (1 - x**2) * v - x], dim=1), torch.zeros_like(mu)


def vdp_scipy(y0, mu, times):
    sol = scipy.integrate.solve_ivp(
        lambda t, y: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]], (times[0], times[-1]), y0,
        t_eval=times, method="DOP853", rtol=1e-12, atol=1e-12)
    return sol.y.T


def make_batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.empty(n, dtype=f64).uniform_(0.5, 4.0, generator=g)
    y0 = torch.randn(n, 2, dtype=f64, generator=g) * 2
    return y0, mu


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_matches_scipy_at_every_output_time(method):
    y0, mu = make_batch(6)
    times = np.array([0.0, 0.3, 1.0, 1.7, 2.5, 4.0])
    tol = 1e-7
    ys, mus = odeint(vdp_rows, (y0, mu), torch.tensor(times, dtype=f64), rtol=tol, atol=tol,
                     method=method, options=PS)
    assert ys.shape == (6, 6, 2) and mus.shape == (6, 6)
    assert torch.equal(ys[0], y0) and torch.equal(mus[-1], mu)
    for i in range(6):
        ref = vdp_scipy(y0[i].numpy(), float(mu[i]), times)
        err = np.abs(ys[:, i].numpy() - ref).max()
        assert err < 300 * tol * max(1.0, np.abs(ref).max()), (i, err)


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_sample_result_independent_of_batch(grad_mode):
    """A sample's answer is the same solved alone, in its batch, or in a different batch (with
    grad mode: fresh buffers each step; without: preallocated buffers, rebuilt on compaction)."""
    with torch.set_grad_enabled(grad_mode):
        _check_batch_independence()


def _check_batch_independence():
    y0, mu = make_batch(12, seed=1)
    t = torch.tensor([0.0, 1.5, 3.0], dtype=f64)
    full, _ = odeint(vdp_rows, (y0, mu), t, rtol=1e-6, atol=1e-6, options=PS)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))[:5]
    part, _ = odeint(vdp_rows, (y0[perm], mu[perm]), t, rtol=1e-6, atol=1e-6, options=PS)
    torch.testing.assert_close(part, full[:, perm], rtol=1e-11, atol=1e-11)
    for i in (0, 4, 11):
        alone, _ = odeint(vdp_rows, (y0[i:i + 1], mu[i:i + 1]), t, rtol=1e-6, atol=1e-6, options=PS)
        torch.testing.assert_close(alone[:, 0], full[:, i], rtol=1e-11, atol=1e-11)


def test_joint_and_per_sample_agree_within_tolerance():
    y0, mu = make_batch(8, seed=2)
    t = torch.linspace(0, 3, 4, dtype=f64)
    tol = 1e-8
    joint, _ = odeint(vdp_rows, (y0, mu), t, rtol=tol, atol=tol)
    per, _ = odeint(vdp_rows, (y0, mu), t, rtol=tol, atol=tol, options=PS)
    assert (joint - per).abs().max() < 1000 * tol
    # and they are genuinely different solves (different step sequences)
    assert not torch.equal(joint, per)


def test_finished_samples_cost_nothing():
    """Easy samples leave the active set: the work is far below nfe x batch, and a batch's work is
    the sum of its samples' work alone."""
    y0 = torch.tensor([[1.0, 0.0]] * 4, dtype=f64)
    mu = torch.tensor([0.1, 0.1, 0.1, 8.0], dtype=f64)
    t = torch.tensor([0.0, 6.0], dtype=f64)
    s = SolverStats()
    odeint(vdp_rows, (y0, mu), t, rtol=1e-6, atol=1e-6, options=PS, stats=s)
    assert s.sample_evaluations < 0.5 * s.nfe_forward * 4
    alone = 0
    for i in range(4):
        si = SolverStats()
        odeint(vdp_rows, (y0[i:i + 1], mu[i:i + 1]), t, rtol=1e-6, atol=1e-6, options=PS, stats=si)
        alone += si.sample_evaluations
    assert s.sample_evaluations == alone
    assert s.steps_accepted > 0 and s.nfe_forward > 0


def test_backwards_in_time_and_vector_time():
    """y' = -k t y per sample (k in the state): y(t) = y(t0) exp(-k (t² - t0²)/2); integrate 2 -> 0."""
    k = torch.tensor([0.5, 1.0, 2.0], dtype=f64)
    y1 = torch.tensor([1.0, -2.0, 0.5], dtype=f64)
    seen = []

    def f(t, state):
        y, kk = state
        seen.append(t.shape)
        return -kk * t * y, torch.zeros_like(kk)

    t = torch.tensor([2.0, 1.0, 0.0], dtype=f64)
    y, _ = odeint(f, (y1, k), t, rtol=1e-9, atol=1e-10, options=PS)
    exact = y1[None] * torch.exp(-k[None] * (t[:, None] ** 2 - 4.0) / 2)
    torch.testing.assert_close(y, exact, rtol=1e-7, atol=1e-8)
    assert all(len(s) == 1 for s in seen)  # func received one time per active sample


def test_cnf_like_tuple_state():
    """(z, logp) with dlogp/dt = -tr(∂f/∂z) for the linear field f = A z: logp(t) = -t·tr(A)."""
    A = torch.tensor([[-0.3, 1.0], [-1.0, -0.2]], dtype=f64)
    z0 = torch.randn(5, 2, dtype=f64, generator=torch.Generator().manual_seed(0))

    def f(t, state):
        z, _ = state
        return z @ A.T, torch.full((z.shape[0], 1), -float(torch.trace(A)), dtype=f64)

    t = torch.tensor([0.0, 1.0], dtype=f64)
    z, logp = odeint(f, (z0, torch.zeros(5, 1, dtype=f64)), t, rtol=1e-9, atol=1e-10, options=PS)
    exact = z0 @ torch.linalg.matrix_exp(A).T
    torch.testing.assert_close(z[-1], exact, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(logp[-1], torch.full((5, 1), 0.5, dtype=f64), rtol=1e-9, atol=1e-9)


def test_backprop_through_per_sample_solve():
    """d/da of y(T) = y0 exp(a T) is T y0 exp(a T), per sample."""
    a = torch.tensor([0.3, -0.7, 1.1], dtype=f64, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0, -0.5], dtype=f64)

    def f(t, state):
        y, aa = state
        return aa * y, torch.zeros_like(aa)

    t = torch.tensor([0.0, 1.5], dtype=f64)
    y, _ = odeint(f, (y0, a), t, rtol=1e-10, atol=1e-10, options=PS)
    y[-1].sum().backward()
    expected = 1.5 * y0 * torch.exp(a.detach() * 1.5)
    torch.testing.assert_close(a.grad, expected, rtol=1e-7, atol=1e-9)


def test_adjoint_inference_path_and_grad_error():
    y0, mu = make_batch(4)
    t = torch.tensor([0.0, 1.0], dtype=f64)
    with torch.no_grad():
        ya, _ = odeint_adjoint(vdp_rows, (y0, mu), t, rtol=1e-7, atol=1e-7, options=PS)
    yp, _ = odeint(vdp_rows, (y0, mu), t, rtol=1e-7, atol=1e-7, options=PS)
    torch.testing.assert_close(ya, yp, rtol=0, atol=0)
    with pytest.raises(ValueError, match="per_sample"):
        odeint_adjoint(vdp_rows, (y0.requires_grad_(True), mu), t, options=PS)


def test_float32_and_work_counts():
    y0, mu = make_batch(16)
    s = SolverStats()
    y, _ = odeint(vdp_rows, (y0.float(), mu.float()), torch.tensor([0.0, 2.0]), rtol=1e-5, atol=1e-5,
                  options=PS, stats=s)
    assert y.dtype == torch.float32
    ref = np.stack([vdp_scipy(y0[i].numpy(), float(mu[i]), np.array([0.0, 2.0]))[-1] for i in range(16)])
    assert np.abs(y[-1].numpy() - ref).max() < 1e-2
    assert 0 < s.sample_evaluations <= 16 * s.nfe_forward
    # the largest last step of the samples: a positive float below the span
    assert isinstance(s.last_step_size, float) and 0 < s.last_step_size <= 2.0


@pytest.mark.parametrize("bad", [
    dict(method="rk4", options=dict(step_control="per_sample", step_size=0.1)),
    dict(options=dict(step_control="per_sample", step_t=[0.5])),
    dict(options=dict(step_control="sideways")),
    dict(rtol=torch.full((3, 2), 1e-6, dtype=f64), options=PS),
])
def test_unsupported_settings_raise(bad):
    y0 = torch.ones(3, 2, dtype=f64)
    with pytest.raises(ValueError):
        odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=f64), **bad)


def test_members_must_share_batch_dim():
    with pytest.raises(ValueError, match="batch"):
        odeint(lambda t, s: s, (torch.ones(3, 2, dtype=f64), torch.ones(4, dtype=f64)),
               torch.tensor([0.0, 1.0], dtype=f64), options=PS)


def test_max_num_steps_names_the_sample():
    y0, mu = make_batch(3)
    with pytest.raises(MaxNumStepsError, match="sample"):
        odeint(vdp_rows, (y0, mu), torch.tensor([0.0, 5.0], dtype=f64), rtol=1e-9, atol=1e-9,
               options=dict(step_control="per_sample", max_num_steps=20))


def test_bad_field_output_shape():
    with pytest.raises(ValueError, match="shape"):
        odeint(lambda t, y: y[:, :1], torch.ones(3, 2, dtype=f64), torch.tensor([0.0, 1.0], dtype=f64),
               options=PS)


def test_cnf_log_density_does_not_depend_on_batch_mates():
    """A CNF's log-density with per-sample step control: the same for a point alone, in its
    request, or in another request; and within tolerance of the joint-stepping answer."""
    from dataclasses import replace

    from node_engine.models.cnf import CNF

    torch.manual_seed(0)
    model = CNF.from_spec({"type": "cnf", "hidden_dims": [16, 16]}, {"rtol": 1e-6, "atol": 1e-6}, dim=2).double().eval()
    with torch.no_grad():  # a non-trivial flow: larger weights than at initialisation
        for p in model.parameters():
            p.mul_(3.0)
    x = torch.randn(24, 2, dtype=f64, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        joint = model.log_prob(x)
        model.solver = replace(model.solver, step_control="per_sample")
        full = model.log_prob(x)
        part = model.log_prob(x[5:17])
        alone = torch.cat([model.log_prob(x[i:i + 1]) for i in (0, 9, 23)])
    torch.testing.assert_close(part, full[5:17], rtol=0, atol=1e-11)
    torch.testing.assert_close(alone, full[[0, 9, 23]], rtol=0, atol=1e-11)
    assert (joint - full).abs().max() < 1e-3


def test_singular_sample_raises_named_error_for_that_sample():
    """y' = -k sqrt(y) reaches y = 0 at t = 2/k; beyond it the field is NaN for any overshoot.
    Sample 1 (k = 10) hits it at t = 0.2; the error names sample 1 and that time."""
    from node_engine.errors import SolverError

    k = torch.tensor([1.0, 10.0], dtype=f64)

    def f(t, state):
        y, kk = state
        return -kk * torch.sqrt(y), torch.zeros_like(kk)

    with pytest.raises(SolverError, match=r"sample 1 .*t=0\.2"):
        odeint(f, (torch.ones(2, dtype=f64), k), torch.tensor([0.0, 1.0], dtype=f64), rtol=1e-6, atol=1e-9,
               options=PS)


def test_gradient_to_field_parameters():
    """Backprop to a parameter of func (y0 without grad): d/dk of y0 exp(-k T) = -T y0 exp(-k T)."""
    k = torch.tensor(0.8, dtype=f64, requires_grad=True)
    y0 = torch.tensor([[1.0], [2.0], [-1.0]], dtype=f64)
    y = odeint(lambda t, y: -k * y, y0, torch.tensor([0.0, 2.0], dtype=f64), rtol=1e-10, atol=1e-10, options=PS)
    y[-1].sum().backward()
    expected = float(-2.0 * y0.sum() * torch.exp(-2.0 * k.detach()))
    assert abs(float(k.grad) - expected) < 1e-7


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_time_grid_per_sample_matches_closed_form(method):
    """t of shape (B, T): y' = cos(t) y per row, y = y0 exp(sin t - sin t[b, 0]); rows start at
    different times, have different spacings, and one grid runs backwards (all rows do then)."""
    y0 = torch.tensor([1.0, -2.0, 0.5], dtype=f64)
    seen = []

    def f(t, y):
        seen.append(t.shape)
        return torch.cos(t) * y

    for sign in (1.0, -1.0):
        grid = sign * torch.tensor([[0.0, 0.4, 1.1, 2.0], [0.5, 0.6, 0.7, 3.0], [-1.0, 0.0, 0.1, 0.2]], dtype=f64)
        y = odeint(f, y0, grid, rtol=1e-9, atol=1e-10, method=method, options=PS)
        assert y.shape == (4, 3)
        exact = y0[None] * torch.exp(torch.sin(grid.T) - torch.sin(grid[:, 0])[None])
        torch.testing.assert_close(y, exact, rtol=2e-7, atol=1e-8)
    assert all(len(s_) == 1 for s_ in seen)


def test_time_grid_sample_alone_equals_in_batch():
    y0, mu = make_batch(6, seed=4)
    g = torch.Generator().manual_seed(5)
    starts = torch.rand(6, 1, dtype=f64, generator=g)
    grid = starts + torch.cumsum(torch.rand(6, 5, dtype=f64, generator=g) + 0.05, 1) - 0.05
    full, _ = odeint(vdp_rows, (y0, mu), grid, rtol=1e-7, atol=1e-7, method="tsit5", options=PS)
    for i in (0, 3, 5):
        alone, _ = odeint(vdp_rows, (y0[i:i + 1], mu[i:i + 1]), grid[i:i + 1], rtol=1e-7, atol=1e-7,
                          method="tsit5", options=PS)
        torch.testing.assert_close(alone[:, 0], full[:, i], rtol=0, atol=0)
        ref = vdp_scipy(y0[i].numpy(), float(mu[i]), grid[i].numpy() - float(grid[i, 0]))
        assert np.abs(full[:, i].numpy() - ref).max() < 1e-4


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_time_grid_gradient_by_backprop(method):
    """y' = a y on row b's own grid: d y(t_j)/d a_b = (t_j - t_0) y0 exp(a_b (t_j - t_0))."""
    a = torch.tensor([0.3, -0.7, 1.1], dtype=f64, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0, -0.5], dtype=f64)
    grid = torch.tensor([[0.0, 0.5, 1.5], [1.0, 1.2, 1.3], [-0.5, 0.0, 0.8]], dtype=f64)
    y, _ = odeint(lambda t, s: (s[1] * s[0], torch.zeros_like(s[1])), (y0, a), grid, rtol=1e-10, atol=1e-10,
                  method=method, options=PS)
    dt = (grid - grid[:, :1]).T  # (T, B)
    exact = y0 * torch.exp(a.detach() * dt)
    torch.testing.assert_close(y.detach(), exact, rtol=1e-8, atol=1e-9)
    y.sum().backward()
    torch.testing.assert_close(a.grad, (dt * exact).sum(0), rtol=1e-8, atol=2e-8)


def test_adjoint_rejects_time_grid_with_gradients():
    y0 = torch.ones(2, dtype=f64, requires_grad=True)
    grid = torch.tensor([[0.0, 1.0], [0.5, 1.0]], dtype=f64)
    with pytest.raises(ValueError, match=r"\(B, T\) grid"):
        odeint_adjoint(lambda t, y: -y, y0, grid, options=PS)
    with pytest.raises(ValueError, match="per_sample"):
        odeint(lambda t, y: -y, y0, grid)  # a (B, T) grid needs per-sample control
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        odeint(lambda t, y: -y, y0, grid[:1], options=PS)
    with pytest.raises(ValueError, match="strictly"):
        odeint(lambda t, y: -y, y0, torch.tensor([[0.0, 1.0], [1.0, 0.5]], dtype=f64), options=PS)


def test_conv_shaped_state_and_per_member_tolerances():
    """(B, C, H, W) rows with per-sample decay rates k_b: y = y0 exp(-k_b t); a tuple state with a
    tolerance per member; and a zero-derivative member never changes step control (the same steps
    as with the rate held outside the state; the answers differ only by the norm's round-off)."""
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(4, 2, 3, 3, dtype=f64, generator=g)
    k = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=f64)
    t = torch.tensor([0.0, 0.7, 1.0], dtype=f64)

    def f(t, s):
        y, kk = s
        return -kk[:, None, None, None] * y, torch.zeros_like(kk)

    y, _ = odeint(f, (y0, k), t, rtol=(1e-9, 1e-3), atol=(1e-10, 1e-3), options=PS)
    assert y.shape == (3, 4, 2, 3, 3)
    exact = y0[None] * torch.exp(-k[None, :, None, None, None] * t[:, None, None, None, None])
    torch.testing.assert_close(y, exact, rtol=1e-7, atol=1e-9)
    for b in range(4):
        s_alone, s_state = SolverStats(), SolverStats()
        alone = odeint(lambda t, yy, b=b: -k[b] * yy, y0[b:b + 1], t, rtol=1e-9, atol=1e-10, options=PS,
                       stats=s_alone)
        in_state, _ = odeint(f, (y0[b:b + 1], k[b:b + 1]), t, rtol=1e-9, atol=1e-10, options=PS, stats=s_state)
        assert (s_state.steps_accepted, s_state.steps_rejected) == (s_alone.steps_accepted, s_alone.steps_rejected)
        torch.testing.assert_close(in_state, alone, rtol=1e-13, atol=1e-15)
