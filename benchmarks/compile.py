"""torch.compile of the vector field (issue 6, item 5): first-call cost and steady state.

    python benchmarks/compile.py [--reps 15] [--threads 1]

Field: the MLP of benchmarks/solvers.py (dim 2, hidden 64, tanh), batch 256, dopri5 at
rtol = atol = 1e-5, t ∈ [0, 1], float32, no grad. ``eager`` is the module, ``compiled`` is
``node_engine.compile_field(module)`` (inductor). First call: wall time of the first solve with
the compiled field (includes compilation; PyTorch caches compiled kernels on disk, so a second
process compiles faster — both numbers are printed when the cache is warm/cold). Steady state:
medians over ``--reps`` interleaved solves. torchdiffeq with the eager field is the usual reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import torchdiffeq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from node_engine import SolverStats, compile_field, odeint  # noqa: E402
from solvers import MLP  # noqa: E402


class Pure(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, y):
        return self.net(y)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # a pure field (no call counter: Python-side state in forward makes dynamo recompile)
    field = Pure(MLP(2).net)
    compiled = compile_field(Pure(field.net))
    y0 = torch.randn(args.batch, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 1.0])

    def solve(kind):
        s = SolverStats()
        with torch.no_grad():
            start = time.perf_counter()
            if kind == "tdq":
                y = torchdiffeq.odeint(field, y0, t, rtol=1e-5, atol=1e-5)
            else:
                y = odeint(compiled if kind == "compiled" else field, y0, t, rtol=1e-5, atol=1e-5, stats=s)
            return time.perf_counter() - start, y[-1], s.nfe_forward

    first, y_c, nfe_c = solve("compiled")
    second, _, _ = solve("compiled")
    walls = {"eager": [], "compiled": [], "tdq": []}
    kinds = list(walls)
    for r in range(args.reps):
        for k in kinds[r % 3:] + kinds[: r % 3]:
            w, y, n = solve(k)
            walls[k].append(w)
            if k == "eager":
                y_e, nfe_e = y, n
    med = {k: statistics.median(v) for k, v in walls.items()}
    print(f"MLP d=2 B={args.batch}, dopri5 1e-5, float32, threads={args.threads}, {args.reps} interleaved reps")
    print(f"first compiled solve (includes compilation): {first:.1f} s; second: {second * 1e3:.1f} ms")
    print("| field | steady-state wall [ms] | vs eager | vs torchdiffeq | NFE | max |y - y_eager| |")
    print("|---|---|---|---|---|---|")
    print(f"| eager | {med['eager'] * 1e3:.2f} | 1.00 | {med['eager'] / med['tdq']:.2f} | {nfe_e} | 0 |")
    print(f"| compiled | {med['compiled'] * 1e3:.2f} | {med['compiled'] / med['eager']:.2f} | "
          f"{med['compiled'] / med['tdq']:.2f} | {nfe_c} | {float((y_c - y_e).abs().max()):.1e} |")
    print(f"| torchdiffeq (eager field) | {med['tdq'] * 1e3:.2f} | {med['tdq'] / med['eager']:.2f} | 1.00 | | |")


if __name__ == "__main__":
    main()
