"""options["compile"] (issue 17): the compiled trial step gives the eager solve's answers to
round-off, with the same step sequence (joint, per sample with compaction, the adjoint's forward and
its backward with the CNF's fused exact-trace dynamics, behind ODEFORGE_HEAVY_COMPILE=1), falls
back to eager on a graph break with a warning, and reports its compile time. Each distinct compiled
step costs one Inductor compile (10-40 s on 2 cores): the default run makes two (~1.5 min), reused
across tests through the module-level cache."""

import io
import math
import os
import shutil
import warnings

import pytest
import torch

from node_engine import SolverStats, odeint, odeint_adjoint
from node_engine.models.cnf import CNF, _AugmentedDynamics
from node_engine.solvers import compiled_step

pytestmark = [
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="torch.compile's inductor backend needs a C++ compiler"),
    pytest.mark.slow,  # four Inductor compiles: ~1-2 min on 2 cores
]

D64 = torch.float64
MU = torch.tensor([0.5, 2.0, 6.0, 9.0], dtype=D64)
Y0 = torch.tensor([[2.0, 0.0], [1.0, -1.0], [-0.5, 2.0], [0.3, 0.1]], dtype=D64)
T = torch.linspace(0.0, 3.0, 5, dtype=D64)
TOL = dict(rtol=1e-7, atol=1e-7)


def vdp(t, y):  # van der Pol per row, mu from the module (a closure tensor of the compiled step)
    x, v = y[:, 0], y[:, 1]
    return torch.stack([v, MU * (1 - x * x) * v - x], 1)


def vdp_rows(t, state):  # per sample: mu rides along (dmu/dt = 0) so it follows its row
    y, mu = state
    x, v = y[:, 0], y[:, 1]
    return torch.stack([v, mu * (1 - x * x) * v - x], 1), torch.zeros_like(mu)


def solve(func, y0, t, opts, **kw):
    s = SolverStats()
    with torch.no_grad():
        y = odeint(func, y0, t, options=opts, stats=s, **TOL, **kw)
    return y, s


@pytest.fixture(scope="module")
def joint():
    """The eager and the first compiled joint solve (compiles the dopri5 step of vdp once)."""
    return solve(vdp, Y0, T, {}), solve(vdp, Y0, T, {"compile": True})


def test_option_is_validated():
    with pytest.raises(ValueError, match="compile"):
        odeint(vdp, Y0, T, options={"compile": "yes"})
    with pytest.raises(ValueError, match="compile"):
        odeint(vdp, Y0, T, method="kvaerno5", options={"compile": True})


def test_joint_matches_eager_and_reports_compile_time(joint):
    (ye, se), (yc, sc) = joint
    assert sc.compile_fallback is None
    assert sc.compiled_steps == sc.steps_accepted + sc.steps_rejected > 20
    assert (sc.nfe_forward, sc.steps_accepted, sc.steps_rejected) == (se.nfe_forward, se.steps_accepted,
                                                                      se.steps_rejected)
    torch.testing.assert_close(yc, ye, rtol=1e-10, atol=1e-12)  # incl. dense outputs inside steps
    assert sc.compile_seconds > 0 and se.compile_seconds == 0
    # a second solve reuses the compiled step: no compile time, same answer
    y2, s2 = solve(vdp, Y0, T, {"compile": True})
    assert s2.compile_seconds == 0 and s2.compiled_steps == sc.compiled_steps
    torch.testing.assert_close(y2, yc, rtol=0, atol=0)
    assert s2.as_dict()["compiled_steps"] == s2.compiled_steps


def test_adjoint_forward_compiled_backward_eager_without_vjp(joint):
    """odeint_adjoint: the forward solve reuses the joint step compiled above; the backward field
    has no traceable form (autograd.grad), so it runs eagerly and says so; gradients as eager."""
    grads, stats = [], []
    for opts in ({}, {"compile": True}):
        y = Y0.clone().requires_grad_(True)
        s = SolverStats()
        out = odeint_adjoint(vdp, y, T, options=opts, stats=s, adjoint_params=(), **TOL)
        grads.append(torch.autograd.grad(out[-1].square().sum(), y)[0])
        stats.append(s)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-11)
    assert stats[1].compiled_steps > 0 and stats[1].compile_seconds == 0  # cached from the fixture
    assert "adjoint_vjp" in stats[1].compile_fallback
    assert stats[1].nfe_backward == stats[0].nfe_backward


def test_per_sample_matches_eager_through_compaction():
    """Rows with mu from 0.5 to 9 finish at different trial steps, so the active set shrinks (down
    to one row): one dynamic-shape compile serves every size."""
    opts = {"step_control": "per_sample"}
    (ye, _), se = solve(vdp_rows, (Y0, MU), T, opts)
    (yc, _), sc = solve(vdp_rows, (Y0, MU), T, {**opts, "compile": True})
    assert sc.compile_fallback is None and sc.compiled_steps > 0
    assert (sc.sample_evaluations, sc.steps_accepted, sc.steps_rejected) == (
        se.sample_evaluations, se.steps_accepted, se.steps_rejected)
    torch.testing.assert_close(yc, ye, rtol=1e-10, atol=1e-12)
    # rows finish at different times (the compaction ran): their step counts differ
    _, s1 = solve(vdp_rows, (Y0[:1], MU[:1]), T, opts)
    assert s1.steps_accepted * 4 < se.steps_accepted


def test_graph_break_falls_back_to_eager_with_a_warning():
    log = io.StringIO()

    def breaks(t, y):
        print("step", file=log)  # debugging output: dynamo cannot keep print in one graph
        return -0.5 * y

    ye, se = solve(breaks, Y0, T, {})
    with pytest.warns(RuntimeWarning, match="could not be compiled"):
        yc, sc = solve(breaks, Y0, T, {"compile": True})
    assert sc.compile_fallback and sc.compiled_steps == 0
    torch.testing.assert_close(yc, ye, rtol=0, atol=0)
    torch.testing.assert_close(yc[-1], Y0 * math.exp(-0.5 * 3.0), rtol=1e-6, atol=1e-8)  # y' = -y/2
    with warnings.catch_warnings():  # warned once per compiled step, then eager silently
        warnings.simplefilter("error")
        solve(breaks, Y0, T, {"compile": True})


@pytest.mark.skipif(not os.environ.get("ODEFORGE_HEAVY_COMPILE"),
                    reason="two large Inductor compiles (1-4 min on 2 cores); set ODEFORGE_HEAVY_COMPILE=1")
def test_cnf_exact_trace_adjoint_backward_is_compiled():
    """The CNF's fused exact-trace dynamics supply adjoint_vjp, so the backsolve's augmented field
    compiles too: log-density and parameter gradients equal the eager ones, and a second solve with
    new dynamics (as every training iteration) reuses both compiled steps. (~70 s on 2 busy cores
    with bosh3.)"""
    torch.manual_seed(4)
    cnf = CNF.from_spec({"type": "cnf", "hidden_dims": [8, 8], "num_blocks": 1}, {"adjoint": True}, 2).to(D64)
    block = cnf.blocks[0]
    x = torch.randn(16, 2, dtype=D64, generator=torch.Generator().manual_seed(5))
    s = torch.tensor([0.0, 1.0], dtype=D64)
    results = []
    for opts in ({}, {"compile": True}, {"compile": True}):  # the 2nd compiled solve: new dynamics object
        end_time, packed = block.end_time, block.field.packed()
        func = _AugmentedDynamics(block, generative=False, with_logdet=True, regularizers=(),
                                  trace_estimator="exact", eps=None, end_time=end_time, packed=packed)
        assert func.adjoint_vjp is not None
        params = tuple(p for p in (end_time, *packed) if p.requires_grad)
        st = SolverStats()
        z, dlogp = odeint_adjoint(func, (x, torch.zeros(16, dtype=D64)), s, rtol=1e-7, atol=1e-7, method="bosh3",
                                  options=opts, adjoint_params=params, stats=st)
        loss = z[-1].square().sum() + dlogp[-1].sum()
        results.append((loss.detach(), torch.autograd.grad(loss, list(block.parameters())), st))
    (le, ge, se), (lc, gc, sc), (l2, g2, s2) = results
    assert sc.compile_fallback is None, sc.compile_fallback
    # the CNF's dynamics are made anew per solve; its compile_key lets them share the compiled steps
    assert s2.compile_seconds == 0 and s2.compiled_steps == sc.compiled_steps and l2 == lc
    assert sc.compiled_steps == se.steps_accepted + se.steps_rejected  # forward and backward compiled
    assert sc.nfe_backward == se.nfe_backward
    torch.testing.assert_close(lc, le, rtol=1e-10, atol=1e-12)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_auto_waits_for_a_reused_field():
    """"auto" compiles only a field solved again (not one made anew per solve, as the CNF's)."""
    def fresh(t, y):
        return -y

    for _ in range(2):
        y, s = solve(fresh, Y0, T, {"compile": "auto"})
        assert s.compiled_steps == 0 and "auto" in s.compile_fallback
    torch.testing.assert_close(y[-1], Y0 * math.exp(-3.0), rtol=1e-6, atol=1e-8)


def test_cache_is_bounded():
    assert len(compiled_step._CACHE) <= compiled_step._CACHE_MAX
