"""torch.compile of the vector field (issue 6, item 5) and of the whole trial step (issue 17,
``options["compile"]``): first-call cost and steady state.

    python benchmarks/compile.py [--reps 15] [--threads 1]
    python benchmarks/compile.py --step [--reps 5]     # issue 17: the compiled trial step
    python benchmarks/compile.py --cnf [--iters 6]     # issue 17: CNF training iteration, compiled

``--step``: MLP (d=2, hidden 64, tanh, batch 256, float32, t in [0, 1]) and van der Pol (batch 256,
mu ~ U[0.5, 10], float64, t in [0, 10], joint and per-sample), dopri5 at rtol = atol = 1e-5, no grad:
node_engine eager, node_engine with ``options={"compile": True}`` and torchdiffeq, interleaved,
medians over ``--reps``; compile time (``SolverStats.compile_seconds``) apart.

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


def step_main(args):
    """Issue 17: eager vs compiled trial step vs torchdiffeq (see the module docstring)."""
    from per_sample import make_problem, per_sample_field

    dev = torch.device(args.device)
    y0m = torch.randn(args.batch, 2, generator=torch.Generator().manual_seed(1)).to(dev)
    mlp = Pure(MLP(2).net).to(dev)
    yv, mu = (x.to(dev) for x in make_problem(args.batch))

    def vdp(t, y):
        x, v = y[:, 0], y[:, 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], 1)

    problems = {
        "MLP d=2 B=256 float32 joint": (mlp, y0m, torch.tensor([0.0, 1.0], device=dev), {}),
        "vdP B=256 float64 joint": (vdp, yv, torch.tensor([0.0, 10.0], dtype=torch.float64, device=dev), {}),
        "vdP B=256 float64 per_sample": (per_sample_field, (yv, mu), torch.tensor([0.0, 10.0], dtype=torch.float64, device=dev),
                                         {"step_control": "per_sample"}),
    }
    print(f"dopri5 rtol=atol=1e-5, no grad, device {dev}, threads={args.threads}, {args.reps} interleaved reps (medians)")
    print("| problem | eager [ms] | compiled [ms] | compiled / eager | torchdiffeq [ms] | compiled / tdq | "
          "eager / tdq | trial steps | compile [s] | max |y_c - y_e| |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (f, y0, t, opts) in problems.items():
        def solve(kind):
            s = SolverStats()
            with torch.no_grad():
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                if kind == "tdq":
                    if opts:
                        return None, None, s
                    y = torchdiffeq.odeint(f, y0, t, rtol=1e-5, atol=1e-5)
                else:
                    o = dict(opts, compile=True) if kind == "compiled" else opts
                    y = odeint(f, y0, t, rtol=1e-5, atol=1e-5, options=o, stats=s)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                w = time.perf_counter() - start
            return w, (y[0] if isinstance(y, tuple) else y)[-1], s

        _, y_c, s_first = solve("compiled")
        walls = {"eager": [], "compiled": [], "tdq": []}
        kinds = list(walls)
        for r in range(args.reps):
            for k in kinds[r % 3:] + kinds[: r % 3]:
                w, y, s = solve(k)
                walls[k].append(w)
                if k == "eager":
                    y_e, s_e = y, s
        med = {k: statistics.median(v) if v[0] is not None else float("nan") for k, v in walls.items()}
        steps = s_e.steps_accepted + s_e.steps_rejected
        if opts:
            steps = f"{steps / args.batch:.0f}/sample"
        print(f"| {name} | {med['eager'] * 1e3:.1f} | {med['compiled'] * 1e3:.1f} | {med['compiled'] / med['eager']:.2f} | "
              f"{med['tdq'] * 1e3:.1f} | {med['compiled'] / med['tdq']:.2f} | {med['eager'] / med['tdq']:.2f} | {steps} | "
              f"{s_first.compile_seconds:.1f} | {float((y_c - y_e).abs().max()):.1e} |", flush=True)


def cnf_main(args):
    """Issue 17: one FFJORD-toy CNF training iteration (benchmarks/cnf_training.py's model: 2-64-64-64-2
    ConcatSquash, tanh, exact trace, dopri5 1e-5, backsolve seminorm adjoint, batch 512, Adam) eager
    vs ``options["compile"]=True`` on two copies with the same weights and batches, interleaved."""
    import copy

    from cnf_training import make_ours, moons
    from node_engine.specs import SolverSection

    plain = SolverSection.solver_options

    def compiled_options(self, *a, **k):
        return {**plain(self, *a, **k), "compile": True}

    train = moons(20000, 0)
    train = torch.tensor((train - train.mean(0)) / train.std(0), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    eager = make_ours()
    comp = copy.deepcopy(eager)
    opts = {id(m): torch.optim.Adam(m.parameters(), lr=1e-3) for m in (eager, comp)}
    walls = {"eager": [], "compiled": []}
    nfe = {}
    compile_s = 0.0
    for it in range(args.iters + 1):  # iteration 0 compiles: left out of the medians
        xb = train[torch.randint(0, len(train), (args.batch,), generator=g)]
        for who in (("eager", "compiled") if it % 2 else ("compiled", "eager")):
            m = eager if who == "eager" else comp
            SolverSection.solver_options = compiled_options if who == "compiled" else plain
            m.train()
            m.stats.reset()
            opts[id(m)].zero_grad()
            start = time.perf_counter()
            (-m.log_prob(xb).mean()).backward()
            opts[id(m)].step()
            w = time.perf_counter() - start
            if who == "compiled":
                compile_s += m.stats.compile_seconds
                fb = m.stats.compile_fallback
            if it:
                walls[who].append(w)
            nfe[who] = (m.stats.nfe_forward, m.stats.nfe_backward)
        print(f"iter {it}: eager {walls['eager'][-1] if it else float('nan'):.3f} s, compiled "
              f"{walls['compiled'][-1] if it else w:.3f} s, NFE {nfe}", flush=True)
    SolverSection.solver_options = plain
    me, mc = statistics.median(walls["eager"]), statistics.median(walls["compiled"])
    print(f"CNF training iteration, batch {args.batch}, {args.iters} iterations (after one compiling iteration), "
          f"threads={args.threads}: eager {me:.3f} s, compiled {mc:.3f} s, compiled / eager {mc / me:.2f}; "
          f"compile {compile_s:.1f} s in all; fallback: {fb}")


if __name__ == "__main__":
    if "--cnf" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--cnf", action="store_true")
        ap.add_argument("--iters", type=int, default=6)
        ap.add_argument("--threads", type=int, default=1)
        ap.add_argument("--batch", type=int, default=512)
        a = ap.parse_args()
        torch.set_num_threads(a.threads)
        cnf_main(a)
    elif "--step" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--step", action="store_true")
        ap.add_argument("--reps", type=int, default=5)
        ap.add_argument("--threads", type=int, default=1)
        ap.add_argument("--batch", type=int, default=256)
        ap.add_argument("--device", default="cpu")
        a = ap.parse_args()
        torch.set_num_threads(a.threads)
        step_main(a)
    else:
        main()
