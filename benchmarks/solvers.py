"""Solver benchmark: node_engine vs torchdiffeq 0.2.5, side by side in one process (issue 3).

    python benchmarks/solvers.py [--reps 7] [--threads 1] [--device cuda] [--quick] [--only TEXT] [--replay]

Rows: an MLP vector field (dim 2 at batch 256 and 4096; dim 16 at batch 512), van der Pol
(batch 256, μ = 2), the paper's ODE-Net conv block (64×7×7, batch 16), and the adjoint of the dim-2/batch-256 MLP with the default norm and with the
seminorm. Both libraries run interleaved (alternating which goes first), ``--reps`` times; the
table shows medians. Columns:

- wall ratio: node_engine wall / torchdiffeq wall (< 1: node_engine is faster)
- NFE fwd / bwd for each library (counted by wrapping the field)
- error: max abs error of y(t1) (adjoint rows: relative error of the gradient) against a float64
  reference (scipy DOP853 at rtol=atol=1e-12 for states; a float64 DOP853 checkpoint-adjoint
  solve at 1e-12 for gradients)
- R: overhead ratio wall / (NFE × one field call) (backward calls timed as call + vjp)

torchdiffeq is imported only here (``pip install .[bench]``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import clock  # benchmarks/clock.py, beside this script
from pathlib import Path

import numpy as np
import scipy.integrate
import torch
from torch import nn

import torchdiffeq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from node_engine import SolverStats, odeint, odeint_adjoint

DEVICE = torch.device("cpu")  # --device


class MLP(nn.Module):
    """dy/dt = W3 tanh(W2 tanh(W1 y + b1) + b2) + b3, hidden 64 (time-independent)."""

    def __init__(self, dim: int, hidden: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, dim))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / max(p.shape[-1], 1) ** 0.5))
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.net(y)


class ConvBlockField(nn.Module):
    """The ODE-Net's vector field (``ConvODEFunc``: GN-ReLU-ConcatConv-GN-ReLU-ConcatConv-GN, 64 channels)."""

    def __init__(self, channels: int = 64, seed: int = 0):
        super().__init__()
        from node_engine.models.classifiers import ConvODEFunc

        torch.manual_seed(seed)
        self.f = ConvODEFunc(channels)
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.f(t, y)


class VanDerPol(nn.Module):
    def __init__(self, mu: float):
        super().__init__()
        self.mu = mu
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], -1)


def scipy_reference(field: nn.Module, y0: torch.Tensor, t1: float, tol: float = 1e-12) -> torch.Tensor:
    f64 = _to64(field)
    shape = y0.shape

    def rhs(_t, y):
        with torch.no_grad():
            return f64(torch.tensor(_t, dtype=torch.float64), torch.from_numpy(y).view(shape)).reshape(-1).numpy()

    sol = scipy.integrate.solve_ivp(rhs, (0.0, t1), y0.double().reshape(-1).numpy(), method="DOP853",
                                    rtol=tol, atol=tol)
    assert sol.success, sol.message
    return torch.from_numpy(sol.y[:, -1]).view(shape)


def _to64(field: nn.Module) -> nn.Module:
    import copy

    f = copy.deepcopy(field).double()
    return f


def time_call(field, y0, n=200, backward=False, rounds=5):
    """Median seconds of one field call (or call + vjp), over ``rounds`` blocks of ``n`` calls."""
    t = torch.tensor(0.0, dtype=y0.dtype, device=y0.device)
    ts = []
    for _ in range(rounds):
        start = clock.now()
        for _ in range(n):
            if backward:
                y = y0.detach().requires_grad_(True)
                out = field(t, y)
                torch.autograd.grad(out, (y,) + tuple(field.parameters()), torch.ones_like(out))
            else:
                with torch.no_grad():
                    field(t, y0)
        ts.append((clock.now() - start) / n)
    return statistics.median(ts)


def run_forward(lib, field, y0, t, rtol, atol):
    field.calls = 0
    with torch.no_grad():
        start = clock.now()
        if lib == "ours":
            out = odeint(field, y0, t, rtol=rtol, atol=atol, method="dopri5")
        else:
            out = torchdiffeq.odeint(field, y0, t, rtol=rtol, atol=atol, method="dopri5")
        wall = clock.now() - start
    return wall, field.calls, 0, out[-1]


def run_adjoint(lib, field, y0, t, rtol, atol, norm):
    field.calls = 0
    y = y0.detach().requires_grad_(True)
    params = tuple(field.parameters())
    start = clock.now()
    if lib == "ours":
        s = SolverStats()
        out = odeint_adjoint(field, y, t, rtol=rtol, atol=atol, method="dopri5",
                             adjoint_options=dict(norm=norm), stats=s)
        nf = field.calls
        loss = (out[-1] ** 2).sum()
        grads = torch.autograd.grad(loss, (y,) + params)
    else:
        opts = dict(norm="seminorm") if norm == "seminorm" else None
        out = torchdiffeq.odeint_adjoint(field, y, t, rtol=rtol, atol=atol, method="dopri5", adjoint_options=opts)
        nf = field.calls
        loss = (out[-1] ** 2).sum()
        grads = torch.autograd.grad(loss, (y,) + params)
    wall = clock.now() - start
    return wall, nf, field.calls - nf, torch.cat([g.reshape(-1) for g in grads])


def reference_gradient(field, y0, t):
    f64 = _to64(field)
    y = y0.double().requires_grad_(True)
    out = odeint_adjoint(f64, y, t.double(), rtol=1e-12, atol=1e-12, method="dopri8", adjoint_mode="checkpoint")
    grads = torch.autograd.grad((out[-1] ** 2).sum(), (y,) + tuple(f64.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def solver_alone(field, y0, t, rtol, atol, reps):
    """(field seconds, solver-only seconds) of one node_engine solve, medians over ``reps``.

    The field's outputs of a real solve are recorded; the same solve then runs with a field that
    returns them in order, so the solver repeats the identical step sequence and its own cost
    (stage combinations, copies, norms, control, Python) is timed without the field.
    """
    outs, field_s, solve_s = [], [], []

    def record(tt, y):
        start = clock.now()
        out = field(tt, y)
        field_s[-1] += clock.now() - start
        outs.append(out)
        return out

    def replay(tt, y):
        return outs[next(it)]

    with torch.no_grad():
        for _ in range(reps):
            outs.clear()
            field_s.append(0.0)
            odeint(record, y0, t, rtol=rtol, atol=atol, method="dopri5")
            it = iter(range(len(outs)))
            start = clock.now()
            odeint(replay, y0, t, rtol=rtol, atol=atol, method="dopri5")
            solve_s.append(clock.now() - start)
    return statistics.median(field_s), statistics.median(solve_s)


def bench_row(name, field, y0, t, rtol, atol, reps, adjoint=None):
    if adjoint is None:
        # 1e-12 unless the row's tolerance is loose (the conv rows: a 1e-12 DOP853 solve of a
        # 50k-dimensional conv field takes minutes; 1e-9 is still 10^6 below the row's error)
        ref = scipy_reference(field, y0, float(t[-1]), tol=1e-12 if rtol < 1e-4 else 1e-9)
    else:
        ref = reference_gradient(field, y0, t)
    field, y0, t = field.to(DEVICE), y0.to(DEVICE), t.to(DEVICE)  # references above: on the CPU
    res = {"ours": [], "torchdiffeq": []}
    calls, vjps = [], []
    for r in range(reps + 1):  # first round is warm-up
        order = ["ours", "torchdiffeq"] if r % 2 == 0 else ["torchdiffeq", "ours"]
        # the unit of R, timed in the same rounds (the machine's load drifts)
        calls.append(time_call(field, y0, n=20, rounds=1))
        if adjoint is not None:
            vjps.append(time_call(field, y0, n=10, backward=True, rounds=1))
        for lib in order:
            if adjoint is None:
                out = run_forward(lib, field, y0, t, rtol, atol)
            else:
                out = run_adjoint(lib, field, y0, t, rtol, atol, adjoint)
            if r > 0:
                res[lib].append(out)
    t_call = statistics.median(calls[1:])
    t_vjp = statistics.median(vjps[1:]) if adjoint is not None else 0.0
    row = {"name": name}
    for lib, runs in res.items():
        wall = statistics.median(x[0] for x in runs)
        nf, nb, val = runs[-1][1], runs[-1][2], runs[-1][3]
        if adjoint is None:
            err = float((val.double().cpu() - ref).abs().max())
        else:
            err = float((val.double().cpu() - ref).norm() / ref.norm())
        R = wall / (nf * t_call + nb * t_vjp)
        row[lib] = dict(wall=wall, nfe_f=nf, nfe_b=nb, err=err, R=R)
    row["ratio"] = row["ours"]["wall"] / row["torchdiffeq"]["wall"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the field and state live there)")
    ap.add_argument("--quick", action="store_true", help="fewer rows (smoke test)")
    ap.add_argument("--only", default="", help="run only rows whose name contains this text")
    ap.add_argument("--replay", action="store_true",
                    help="also time node_engine's solver alone (replayed field outputs) on the forward rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = clock.use_device(args.device)
    torch.manual_seed(0)
    rows = []
    t = torch.tensor([0.0, 1.0])
    g = torch.Generator().manual_seed(1)
    cases = [
        ("MLP d=2 B=256", MLP(2), torch.randn(256, 2, generator=g), t, 1e-5, 1e-5, None),
        ("MLP d=2 B=4096", MLP(2), torch.randn(4096, 2, generator=g), t, 1e-5, 1e-5, None),
        ("MLP d=16 B=512", MLP(16, seed=2), torch.randn(512, 16, generator=g), t, 1e-5, 1e-5, None),
        # float64: in float32 both libraries' vdP error is round-off dominated
        ("vdP mu=2 B=256 t<=5 f64", VanDerPol(2.0), 2 * torch.randn(256, 2, generator=g, dtype=torch.float64),
         torch.tensor([0.0, 5.0], dtype=torch.float64), 1e-5, 1e-5, None),
        ("vdP mu=2 B=256 t<=5 f64 tol=1e-7", VanDerPol(2.0), 2 * torch.randn(256, 2, generator=g, dtype=torch.float64),
         torch.tensor([0.0, 5.0], dtype=torch.float64), 1e-7, 1e-7, None),
        # the paper's ODE-Net block: 64 channels at 7x7 (28x28 input after the downsampling), batch
        # 16, rtol = atol = 1e-3 as in the paper's MNIST experiment
        ("conv ODE-Net block 64x7x7 B=16 tol=1e-3", ConvBlockField(),
         torch.randn(16, 64, 7, 7, generator=torch.Generator().manual_seed(2)), t,
         1e-3, 1e-3, None),
        ("adjoint MLP d=2 B=256", MLP(2), torch.randn(256, 2, generator=g), t, 1e-5, 1e-5, "default"),
        ("adjoint+seminorm MLP d=2 B=256", MLP(2), torch.randn(256, 2, generator=g), t, 1e-5, 1e-5, "seminorm"),
    ]
    if args.quick:
        cases = [cases[0], cases[4]]
    cases = [c for c in cases if args.only in c[0]]
    alone = {}
    for name, field, y0, tt, rtol, atol, adj in cases:
        rows.append(bench_row(name, field, y0, tt, rtol, atol, args.reps, adj))
        if args.replay and adj is None:
            alone[name] = solver_alone(field, y0.to(DEVICE), tt.to(DEVICE), rtol, atol, max(args.reps, 7))
        print(f"done: {name}", flush=True)
    print()
    print(f"dopri5, float32 (vdP rows float64), rtol=atol=1e-5 unless noted, device {DEVICE}, torch threads={args.threads}, "
          f"medians of {args.reps} interleaved runs")
    print()
    print("| row | wall ratio (ours/tdq) | wall ours / tdq [ms] | NFE fwd ours / tdq | NFE bwd ours / tdq "
          "| error ours / tdq | R ours / tdq |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        o, d = r["ours"], r["torchdiffeq"]
        print(f"| {r['name']} | {r['ratio']:.2f} | {o['wall'] * 1e3:.1f} / {d['wall'] * 1e3:.1f} "
              f"| {o['nfe_f']} / {d['nfe_f']} | {o['nfe_b']} / {d['nfe_b']} "
              f"| {o['err']:.1e} / {d['err']:.1e} | {o['R']:.2f} / {d['R']:.2f} |")

    if alone:
        print()
        print("| row | field time per solve [ms] | solver alone per solve [ms] | solver / field |")
        print("|---|---|---|---|")
        for name, (fs, ss) in alone.items():
            print(f"| {name} | {fs * 1e3:.2f} | {ss * 1e3:.2f} | {ss / fs:.2f} |")


if __name__ == "__main__":
    main()
