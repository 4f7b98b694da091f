"""node_engine on an accelerator (issue 6, item 6): the solvers, both adjoints, per-sample control
and a whole CNF job (train, checkpoint, log-density, sample) on CUDA give the CPU's answers, and
a solve synchronises with the host once per trial step, not per stage.

Runs where CUDA is present (skipped in CI, which has no GPU). ``ODEFORGE_TEST_DEVICE=cpu`` runs
the same checks on the CPU, to exercise them without a GPU (the sync count needs CUDA). The
GPU check of ``benchmarks/device_check.sh`` runs this file first.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from node_engine import SolverStats, odeint, odeint_adjoint
from node_engine.inference import load_model
from node_engine.training import Trainer, TrainingCallbacks, build_trainer

from .problems import MLPField

DEVICE = os.environ.get("ODEFORGE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (set ODEFORGE_TEST_DEVICE=cpu to run on CPU)")
f64 = torch.float64


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8"])
def test_linear_system_on_device_matches_the_matrix_exponential(method):
    """y' = A y: y(t) = expm(A t) y0 (scipy), at several output times, state on the device."""
    A = np.array([[-0.1, 2.0, 0.0], [-2.0, -0.1, 0.3], [0.0, -0.3, -0.5]])
    y0 = np.array([1.0, 0.5, -1.0])
    t = np.array([0.0, 0.3, 1.1, 2.5])
    A_d = torch.tensor(A, device=DEVICE)
    out = odeint(lambda _t, y: A_d @ y, torch.tensor(y0, device=DEVICE), torch.tensor(t, device=DEVICE),
                 rtol=1e-9, atol=1e-9, method=method)
    assert out.device.type == torch.device(DEVICE).type
    exact = np.stack([scipy.linalg.expm(A * ti) @ y0 for ti in t])
    np.testing.assert_allclose(out.cpu().numpy(), exact, rtol=0, atol=1e-7)


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_adjoint_gradients_on_device_equal_the_cpu_ones(mode):
    field_cpu = MLPField()
    field_dev = MLPField().to(DEVICE)
    y0 = torch.tensor([[0.5, -0.3], [1.0, 0.2], [-0.7, 0.9]], dtype=f64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=f64)
    w = torch.randn(3, 3, 2, generator=torch.Generator().manual_seed(1), dtype=f64)

    def grads(field, dev):
        y = y0.to(dev).requires_grad_(True)
        tt = t.to(dev).requires_grad_(True)  # output times too (one field call per time)
        out = odeint_adjoint(field, y, tt, rtol=1e-9, atol=1e-9, adjoint_mode=mode,
                             adjoint_options=dict(norm="seminorm") if mode == "backsolve" else None)
        gs = torch.autograd.grad((out * w.to(dev)).sum(), [y, tt, *field.parameters()])
        assert all(g.device == y.device for g in gs)
        return torch.cat([g.reshape(-1).cpu() for g in gs])

    g_cpu, g_dev = grads(field_cpu, "cpu"), grads(field_dev, DEVICE)
    assert float((g_dev - g_cpu).norm() / g_cpu.norm()) < 1e-7


def test_per_sample_control_on_device_matches_the_cpu():
    """van der Pol with μ per sample (a tuple member with zero derivative), per-sample steps."""
    g = torch.Generator().manual_seed(0)
    mu = torch.empty(16, dtype=f64).uniform_(0.5, 5.0, generator=g)
    y0 = 2 * torch.randn(16, 2, dtype=f64, generator=g)
    t = torch.tensor([0.0, 1.0, 3.0], dtype=f64)

    def vdp(_t, s):
        y, m = s
        x, v = y[:, 0], y[:, 1]
        return torch.stack([v, m * (1 - x * x) * v - x], 1), torch.zeros_like(m)

    def solve(dev):
        stats = SolverStats()
        ys, _ = odeint(vdp, (y0.to(dev), mu.to(dev)), t.to(dev), rtol=1e-8, atol=1e-8,
                       options=dict(step_control="per_sample"), stats=stats)
        return ys.cpu(), stats.sample_evaluations

    (y_cpu, work_cpu), (y_dev, work_dev) = solve("cpu"), solve(DEVICE)
    assert torch.allclose(y_dev, y_cpu, rtol=0, atol=1e-6)
    assert work_dev == pytest.approx(work_cpu, rel=0.05)


@pytest.mark.skipif(DEVICE is None or torch.device(DEVICE).type != "cuda", reason="counts CUDA host synchronisations")
@pytest.mark.parametrize("control", ["joint", "per_sample"])
def test_one_host_sync_per_trial_step(control):
    """The accept decision is the only per-step sync: no .item() per stage or per output.

    Counted as a difference between two tolerances (more trial steps at the tighter one), so the
    solve's fixed start-up (reading t, moving the tableau, the initial step) cancels out."""
    mlp = MLPField(dim=2, hidden=64).to(DEVICE)
    rows = []  # active rows per field call (host-side shapes: counting them syncs nothing)

    def field(t, y):
        rows.append(y.shape[0])
        return mlp(t, y)

    y0 = torch.randn(256, 2, dtype=f64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    t = torch.linspace(0, 2, 5, dtype=f64, device=DEVICE)
    opts = dict(step_control=control)

    def count(tol):
        with torch.no_grad():
            odeint(field, y0, t, rtol=tol, atol=tol, options=opts)  # warm-up (allocator, kernels)
            rows.clear()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    odeint(field, y0, t, rtol=tol, atol=tol, options=opts)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchronizing" in str(w.message) for w in caught)
        trials = (len(rows) - 2) // 6  # dopri5 (FSAL): 6 calls per trial step, 2 to start
        compactions = sum(b < a for a, b in zip(rows, rows[1:]))  # per-sample: finished rows leave
        return syncs, trials, compactions

    s1, n1, c1 = count(1e-5)
    s2, n2, c2 = count(1e-9)
    assert n2 - n1 > 20 and s1 > 0  # the warnings do reach Python (the start syncs at least once)
    # one sync per extra trial step (+ compactions, + output steps that now fall elsewhere)
    assert s2 - s1 <= (n2 - n1) + abs(c2 - c1) + len(t), (s1, s2, n1, n2, c1, c2)


def test_cnf_job_on_device_trains_like_the_cpu_and_its_checkpoint_loads_anywhere():
    """The same small CNF job on the CPU and on the device (same seed): the same losses; then
    log-densities from the device checkpoint, loaded on the CPU and on the device, agree."""
    spec = {"model": {"type": "cnf", "hidden_dims": [16, 16]}, "dataset": {"name": "moons", "n_samples": 1000},
            "solver": {"rtol": 1e-5, "atol": 1e-5},
            "training": {"iterations": 4, "batch_size": 128, "eval_every": 4, "checkpoint_every": 4}}
    runs = {}
    for dev in ("cpu", DEVICE):
        trainer = build_trainer(spec, device=dev)
        runs[dev] = (trainer, trainer.run())
    trainer, m_dev = runs[DEVICE]
    m_cpu = runs["cpu"][1]
    assert next(trainer.model.parameters()).device.type == torch.device(DEVICE).type
    assert m_dev["loss"] == pytest.approx(m_cpu["loss"], rel=1e-3)
    assert m_dev["test_nll"] == pytest.approx(m_cpu["test_nll"], rel=1e-3)
    data = trainer.checkpoint()
    on_cpu, on_dev = load_model(data, device="cpu"), load_model(data, device=DEVICE)
    x = np.random.default_rng(0).normal(size=(64, 2))
    lp_cpu, _ = on_cpu.log_density(x)
    lp_dev, _ = on_dev.log_density(x)
    np.testing.assert_allclose(lp_dev, lp_cpu, rtol=1e-4, atol=1e-4)
    samples = on_dev.sample(32, seed=3)
    assert samples.shape == (32, 2) and np.isfinite(samples).all()


class _StopAfter(TrainingCallbacks):
    """Asks the trainer to stop after ``n`` steps and keeps the checkpoint it then writes."""

    def __init__(self, n):
        self.n, self.done, self.checkpoint = n, 0, None

    def on_step(self, record):
        self.done = record["step"]

    def should_stop(self):
        return self.done >= self.n

    def on_checkpoint(self, name, data):
        self.checkpoint = data


@pytest.mark.parametrize("first, second", [("cpu", "device"), ("device", "cpu")])
def test_checkpoint_resumes_on_the_other_device(first, second):
    """A job a CPU worker checkpointed resumes on a GPU worker and the other way round, on the
    uninterrupted trajectory: its noise (Hutchinson) comes from a host generator whose state is in
    the checkpoint, so the draws are the same on every device."""
    spec = {"model": {"type": "cnf", "hidden_dims": [8, 8], "trace_estimator": "hutchinson"},
            "dataset": {"name": "moons", "n_samples": 200, "seed": 3},
            "solver": {"rtol": 1e-4, "atol": 1e-4},
            "training": {"iterations": 4, "batch_size": 32, "log_every": 1, "eval_every": 4,
                         "checkpoint_every": 10}}
    where = {"cpu": "cpu", "device": DEVICE}
    full = build_trainer(spec, device="cpu")
    expected = full.run()
    half = build_trainer(spec, device=where[first])
    stop = _StopAfter(2)
    assert half.run(stop)["status"] == "cancelled" and stop.checkpoint is not None
    resumed = Trainer.from_checkpoint(stop.checkpoint, device=where[second])
    out = resumed.run()
    assert resumed.step == 4 and out["status"] == "completed"
    assert out["loss"] == pytest.approx(expected["loss"], rel=1e-3)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(b.cpu(), a, rtol=1e-3, atol=1e-5), name
