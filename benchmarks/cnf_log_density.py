"""CNF log-density with per-sample vs joint step control (the inference endpoint's solve).

    python benchmarks/cnf_log_density.py [--reps 5] [--points 1024] [--scale 2.5]

Model: node_engine CNF, ConcatSquash 2-64-64-64-2, tanh, exact trace, float32, weights from the
default initialisation multiplied by ``--scale`` (a stand-in for a trained flow: non-trivial,
point-dependent dynamics), dopri5 at rtol = atol = 1e-5, evaluated on ``--points`` two-moons points
(standardized). Interleaved medians. Error: max |log p − ref| against the same model in float64
with joint stepping at 1e-10. No torchdiffeq row: torchdiffeq has no per-sample mode (its joint
stepping is the "joint" row's algorithm, see benchmarks/solvers.py for its overhead).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from sklearn.datasets import make_moons

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from node_engine.models.cnf import CNF  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--points", type=int, default=1024)
    ap.add_argument("--scale", type=float, default=2.5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CNF.from_spec({"type": "cnf", "hidden_dims": [64, 64, 64]}, {"rtol": 1e-5, "atol": 1e-5}, dim=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(args.scale)
    x, _ = make_moons(args.points, noise=0.05, random_state=1)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    ref_model = copy.deepcopy(model).double()
    ref_model.set_tolerances(1e-10, 1e-10)
    with torch.no_grad():
        ref = ref_model.log_prob(x.double())
    joint = model
    per = copy.deepcopy(model)
    per.solver = replace(per.solver, step_control="per_sample")
    walls = {"joint": [], "per_sample": []}
    info = {}
    for r in range(args.reps):
        for k in (("joint", "per_sample") if r % 2 == 0 else ("per_sample", "joint")):
            m = joint if k == "joint" else per
            m.stats.reset()
            with torch.no_grad():
                start = time.perf_counter()
                lp = m.log_prob(x)
                walls[k].append(time.perf_counter() - start)
            work = m.stats.sample_evaluations if k == "per_sample" else m.stats.nfe_forward * args.points
            info[k] = (m.stats.nfe_forward, work, float((lp.double() - ref).abs().max()), lp)
    med = {k: statistics.median(v) for k, v in walls.items()}
    print(f"CNF log-density, {args.points} points, weights x{args.scale}, dopri5 1e-5, float32, "
          f"threads={args.threads}, {args.reps} reps")
    print("| step control | batched field calls | work (sample-evaluations) | work ratio | wall [ms] | wall ratio | max err vs f64 1e-10 |")
    print("|---|---|---|---|---|---|---|")
    for k in ("joint", "per_sample"):
        nfe, work, err, _ = info[k]
        print(f"| {k} | {nfe} | {work} | {work / info['joint'][1]:.2f} | {med[k] * 1e3:.0f} | "
              f"{med[k] / med['joint']:.2f} | {err:.1e} |")
    # batch independence: a few points alone vs in the request
    with torch.no_grad():
        alone = torch.cat([per.log_prob(x[i:i + 1]) for i in range(8)])
    print(f"per-sample: max |alone - in request| over 8 points = {float((alone - info['per_sample'][3][:8]).abs().max()):.1e}")
    with torch.no_grad():
        alone_j = torch.cat([joint.log_prob(x[i:i + 1]) for i in range(8)])
    print(f"joint:      max |alone - in request| over 8 points = {float((alone_j - info['joint'][3][:8]).abs().max()):.1e}")


if __name__ == "__main__":
    main()
