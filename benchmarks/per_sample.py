"""Per-sample step control vs joint stepping (issue 6, item 2), side by side in one process.

    python benchmarks/per_sample.py [--reps 5] [--batch 256] [--tol 1e-5] [--device cuda]

Problem: van der Pol x'' = μ(1 - x²)x' - x, batch 256, μ ~ U[0.5, 10] and y0 ~ N(0, 2²) per
sample (seed 0), t ∈ [0, 10], dopri5, rtol = atol = 1e-5, float64. Contenders, interleaved (the
order rotates every repetition), medians over ``--reps``:

- torchdiffeq 0.2.5 joint stepping (one step size for the whole batch; its only mode)
- node_engine joint stepping (default ``step_control="joint"``)
- node_engine ``step_control="per_sample"`` (μ rides along in the state as a second tuple member
  with dμ/dt = 0, so rows stay independent when finished samples are compacted away)

Work = vector-field evaluations of single samples ("sample-steps"): NFE × batch for joint
stepping, the rows actually evaluated for per-sample mode (``SolverStats.sample_evaluations``).
Error: per-sample |y(10) - ref| against scipy DOP853 at rtol = atol = 1e-12 (max and median over
the batch).
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

import torchdiffeq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from node_engine import SolverStats, odeint  # noqa: E402


def make_problem(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.empty(batch, dtype=torch.float64).uniform_(0.5, 10.0, generator=g)
    y0 = torch.randn(batch, 2, dtype=torch.float64, generator=g) * 2.0
    return y0, mu


def references(y0, mu, t1):
    out = []
    for y, m in zip(y0.numpy(), mu.numpy()):
        sol = scipy.integrate.solve_ivp(lambda t, s, m=m: [s[1], m * (1 - s[0] ** 2) * s[1] - s[0]], (0, t1), y,
                                        method="DOP853", rtol=1e-12, atol=1e-12)
        assert sol.success
        out.append(sol.y[:, -1])
    return np.stack(out)


class Joint:
    def __init__(self, mu):
        self.mu = mu
        self.calls = 0

    def __call__(self, t, y):
        self.calls += 1
        x, v = y[:, 0], y[:, 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], 1)


def per_sample_field(t, state):
    y, mu = state
    x, v = y[:, 0], y[:, 1]
    return torch.stack([v, mu * (1 - x * x) * v - x], 1), torch.zeros_like(mu)


def run(kind, y0, mu, t, tol):
    if kind == "per_sample_tight":  # per-sample at a 100x tighter tolerance: its error vs joint's
        kind, tol = "per_sample", tol / 100
    stats = SolverStats()
    start = clock.now()
    with torch.no_grad():
        if kind == "tdq":
            f = Joint(mu)
            y = torchdiffeq.odeint(f, y0, t, rtol=tol, atol=tol, method="dopri5")[-1]
            nfe, work, steps = f.calls, f.calls * y0.shape[0], None
        elif kind == "joint":
            f = Joint(mu)
            y = odeint(f, y0, t, rtol=tol, atol=tol, method="dopri5", stats=stats)[-1]
            nfe, work, steps = f.calls, f.calls * y0.shape[0], stats.steps_accepted + stats.steps_rejected
        else:
            ys, _ = odeint(per_sample_field, (y0, mu), t, rtol=tol, atol=tol, method="dopri5",
                           options=dict(step_control="per_sample"), stats=stats)
            y = ys[-1]
            nfe, work = stats.nfe_forward, stats.sample_evaluations
            steps = (stats.steps_accepted + stats.steps_rejected) / y0.shape[0]
    return clock.now() - start, nfe, work, steps, y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--ref-samples", type=int, default=None,
                    help="error columns over the first N samples only (scipy references take ~10 ms each)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = clock.use_device(args.device)
    y0, mu = make_problem(args.batch)
    n_ref = min(args.ref_samples or args.batch, args.batch)
    ref = references(y0[:n_ref], mu[:n_ref], 10.0)
    y0, mu = y0.to(dev), mu.to(dev)
    t = torch.tensor([0.0, 10.0], dtype=torch.float64, device=dev)
    kinds = ["tdq", "joint", "per_sample", "per_sample_tight"]
    walls = {k: [] for k in kinds}
    info = {}
    for rep in range(args.reps):
        order = kinds[rep % 4:] + kinds[: rep % 4]
        for k in order:
            wall, nfe, work, steps, y = run(k, y0, mu, t, args.tol)
            walls[k].append(wall)
            err = np.abs(y[:n_ref].cpu().numpy() - ref).max(axis=1)
            info[k] = (nfe, work, steps, float(err.max()), float(np.median(err)))
    med = {k: statistics.median(v) for k, v in walls.items()}
    # torchdiffeq's steps: NFE = 6 per trial step + 2 (initial step selection), FSAL
    tdq_steps = (info["tdq"][0] - 2) / 6
    print(f"van der Pol, batch {args.batch}, mu~U[0.5,10], y0~N(0,2^2), t in [0,10], dopri5, rtol=atol={args.tol:g}, "
          f"float64, {args.reps} reps, device {dev}, threads={args.threads}"
          + (f"; errors over the first {n_ref} samples" if n_ref < args.batch else ""))
    print("| mode | trial steps | batched field calls | work (sample-evaluations) | work / tdq joint | "
          "work / ours joint | wall [ms] | wall / tdq joint | wall / ours joint | max err | median err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    names = {"tdq": "torchdiffeq joint", "joint": "node_engine joint", "per_sample": "node_engine per_sample",
             "per_sample_tight": f"node_engine per_sample at tol={args.tol / 100:g}"}
    for k in kinds:
        nfe, work, steps, emax, emed = info[k]
        st = f"{tdq_steps:.0f}" if k == "tdq" else (f"{steps:.0f}" if k == "joint" else f"{steps:.1f} per sample (mean)")
        print(f"| {names[k]} | {st} | {nfe} | {work} | {work / info['tdq'][1]:.3f} | {work / info['joint'][1]:.3f} | "
              f"{med[k] * 1e3:.0f} | {med[k] / med['tdq']:.2f} | {med[k] / med['joint']:.2f} | {emax:.1e} | {emed:.1e} |")


if __name__ == "__main__":
    main()
