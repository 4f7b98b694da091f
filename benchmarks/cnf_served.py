"""Served answers in float32 vs float64: batch dependence and cost (docs/architecture.md, "Inference API").

    python benchmarks/cnf_served.py [--threads 1] [--points 4096] [--probes 50]

For each model (8gaussians CNFs with an exact concatsquash field, a Hutchinson concatsquash field and
a planar field, trained 30 Adam steps at rtol = atol = 1e-3; an odenet with 4 channels trained 3
steps on digits), loaded with ``load_model(..., dtype=...)``: the largest relative difference between
a probe's answer alone and inside a request of ``--points`` points (``--probes`` probes), and the wall
time of that request. The served solve is per-sample in both dtypes; float32 round-off differences
between the scalar-time and per-row-time kernels, or gemm blocking by batch size, can flip a step's
accept decision, which float64 makes vanishingly rare.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from node_engine.inference import load_model  # noqa: E402
from node_engine.training import build_trainer  # noqa: E402

LOOSE = {"rtol": 1e-3, "atol": 1e-3}
FLOWS = {
    "cnf exact": {"type": "cnf", "hidden_dims": [8, 8]},
    "cnf hutchinson": {"type": "cnf", "hidden_dims": [8, 8], "trace_estimator": "hutchinson"},
    "cnf planar field": {"type": "cnf", "vector_field": "planar", "planar_width": 8, "hidden_dims": [16]},
}


def _checkpoint(model: dict, dataset: dict, iterations: int) -> bytes:
    trainer = build_trainer({"model": model, "dataset": dataset, "solver": LOOSE,
                             "training": {"iterations": iterations, "batch_size": 64, "lr": 1e-2, "eval_every": 10**6}})
    trainer.run()
    return trainer.checkpoint()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--points", type=int, default=4096)
    ap.add_argument("--probes", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| model | dtype | max rel. diff alone vs in {args.points} | wall of the request [s] |")
    print("|---|---|---|---|")
    for name, spec in FLOWS.items():
        data = _checkpoint(spec, {"name": "8gaussians", "n_samples": 512}, 30)
        for dtype in (torch.float32, torch.float64):
            model = load_model(data, dtype=dtype)
            rng = np.random.default_rng(0)
            probes = rng.normal(scale=2.0, size=(args.probes, 2))
            alone = np.array([model.log_density(p[None])[0][0] for p in probes])
            crowd = rng.normal(scale=2.0, size=(args.points, 2))
            crowd[:args.probes] = probes
            start = time.perf_counter()
            got = model.log_density(crowd)[0][:args.probes]
            wall = time.perf_counter() - start
            print(f"| {name} | {str(dtype)[6:]} | {np.abs(got / alone - 1).max():.1e} | {wall:.2f} |", flush=True)
    data = _checkpoint({"type": "odenet", "channels": 4}, {"name": "digits", "n_samples": 300}, 3)
    images = load_digits().images[:512]
    for dtype in (torch.float32, torch.float64):
        model = load_model(data, dtype=dtype)
        alone = np.concatenate([model.predict(img[None]) for img in images[:30]])
        start = time.perf_counter()
        got = model.predict(images)[:30]
        wall = time.perf_counter() - start
        print(f"| odenet C=4 (512 images) | {str(dtype)[6:]} | {np.abs(got / alone - 1).max():.1e} | {wall:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
