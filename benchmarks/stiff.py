"""Stiff benchmark: kvaerno5 (adaptive ESDIRK 5(4)) against dopri5 (issue 16, item 6).

    python benchmarks/stiff.py [--dopri5-cap 20000] [--markdown] [--per-sample-only]

Problems (float64, one trajectory, CPU): Robertson kinetics on [0, 1e5] at rtol 1e-6, atol 1e-10
(outputs at 0, 1e-2, 1, 1e2, 1e4, 1e5) and van der Pol with μ = 1000 from (2, 0) on [0, 1000] at
rtol 1e-6, atol 1e-8 (outputs at 0, 250, ..., 1000). Columns: error = max over outputs and
components of |y − ref| / (atol + rtol |ref|), the error in units of the requested tolerance, with
ref from scipy's Radau and BDF at rtol 1e-10 (the larger of the two errors is shown); accepted and
rejected steps; NFE (field calls: stages, Newton iterations and one call per Jacobian; the N
vector–Jacobian products of a Jacobian are not field calls); wall seconds. dopri5 runs with a
``max_num_steps`` cap and is reported as failed when it hits it.

Per-sample rows: Robertson from four initial states (``PER_SAMPLE_Y0``) as one batch with
``step_control="per_sample"`` (each row its own steps, Jacobian and Newton solve) against four
joint solves, one per state: error (max over rows), steps and NFE summed over rows for the joint
solves, wall seconds of the whole batch.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.integrate
import torch

from node_engine import odeint
from node_engine.stats import SolverStats

D = torch.float64
MU = 1000.0


def robertson(t, y):
    y1, y2, y3 = y[0], y[1], y[2]
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2])


def vdp(t, y):
    return torch.stack([y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]])


def _np(f):
    return lambda t, y: f(t, torch.tensor(y, dtype=D)).numpy()


def _vdp_jac(t, y):
    return [[0.0, 1.0], [-2 * MU * y[0] * y[1] - 1, MU * (1 - y[0] ** 2)]]


PROBLEMS = {
    "Robertson": (robertson, [1.0, 0.0, 0.0], [0.0, 1e-2, 1.0, 1e2, 1e4, 1e5], 1e-6, 1e-10, None),
    "van der Pol μ=1000": (vdp, [2.0, 0.0], [0.0, 250.0, 500.0, 750.0, 1000.0], 1e-6, 1e-8, _vdp_jac),
}


def references(f, y0, t, jac):
    """{method: (T, N) solution} of scipy's Radau and BDF at rtol 1e-10 (atol 1e-14); a reference
    solver that fails is left out (and named in the output)."""
    refs = {}
    for m in ("Radau", "BDF"):
        sol = scipy.integrate.solve_ivp(_np(f), (t[0], t[-1]), y0, method=m, rtol=1e-10, atol=1e-14, t_eval=t,
                                        jac=jac)
        if sol.success:
            refs[m] = sol.y.T
        else:
            print(f"# reference {m} failed: {sol.message}")
    return refs


def run(f, y0, t, rtol, atol, method, cap):
    st = SolverStats()
    t0 = time.perf_counter()
    out = odeint(f, torch.tensor(y0, dtype=D), torch.tensor(t, dtype=D), method=method, rtol=rtol, atol=atol,
                 stats=st, options=dict(max_num_steps=cap, raise_on_failure=False))
    wall = time.perf_counter() - t0
    return out.numpy(), st, wall


PER_SAMPLE_Y0 = [[1.0, 0.0, 0.0], [0.9, 0.0, 0.1], [0.5, 0.0, 0.5], [1.0, 1e-5, 0.0]]


def robertson_rows(t, y):
    """Robertson on a batch (B, 3): each row independent (per-sample stepping)."""
    y1, y2, y3 = y[:, 0], y[:, 1], y[:, 2]
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2], 1)


def per_sample_rows() -> list[tuple]:
    _, _, t, rtol, atol, _ = PROBLEMS["Robertson"]
    refs = [references(robertson, y0, t, None) for y0 in PER_SAMPLE_Y0]
    name = f"Robertson ×{len(PER_SAMPLE_Y0)} states"

    def err(out_rows):
        return max(float(np.max(np.abs(o - r) / (atol + rtol * np.abs(r)))) for o, ref in zip(out_rows, refs)
                   for r in ref.values())

    st = SolverStats()
    t0 = time.perf_counter()
    out = odeint(robertson_rows, torch.tensor(PER_SAMPLE_Y0, dtype=D), torch.tensor(t, dtype=D), method="kvaerno5",
                 rtol=rtol, atol=atol, stats=st, options=dict(step_control="per_sample"))
    wall = time.perf_counter() - t0
    ok = bool((st.status == 0).all())
    rows = [(name, "kvaerno5 per_sample (one batch)", rtol, "ok" if ok else "failed",
             err(out.numpy().transpose(1, 0, 2)), st.steps_accepted, st.steps_rejected, st.nfe_forward, wall, float("nan"))]
    outs, acc, rej, nfe, wall = [], 0, 0, 0, 0.0
    for y0 in PER_SAMPLE_Y0:
        o, s, w = run(robertson, y0, t, rtol, atol, "kvaerno5", 100_000)
        outs.append(o)
        acc, rej, nfe, wall = acc + s.steps_accepted, rej + s.steps_rejected, nfe + s.nfe_forward, wall + w
    rows.append((name, "kvaerno5 joint (one solve per state)", rtol, "ok", err(outs), acc, rej, nfe, wall,
                 float("nan")))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dopri5-cap", type=int, default=20_000, help="max_num_steps of dopri5")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--per-sample-only", action="store_true", help="only the per-sample rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, (f, y0, t, rtol, atol, jac) in ({} if args.per_sample_only else PROBLEMS).items():
        refs = references(f, y0, t, jac)
        radau_vs_bdf = (np.max(np.abs(refs["Radau"] - refs["BDF"]) / (atol + rtol * np.abs(refs["Radau"])))
                        if len(refs) == 2 else float("nan"))
        for method, cap in (("kvaerno5", 100_000), ("dopri5", args.dopri5_cap)):
            out, st, wall = run(f, y0, t, rtol, atol, method, cap)
            ok = int(st.status) == 0
            err = max(float(np.max(np.abs(out - r) / (atol + rtol * np.abs(r)))) for r in refs.values()) if ok else float("nan")
            rows.append((name, method, rtol, "ok" if ok else f"failed: max_num_steps={cap} hit",
                         err, st.steps_accepted, st.steps_rejected, st.nfe_forward, wall, radau_vs_bdf))
    rows += per_sample_rows()
    if args.markdown:
        print("| problem | method | rtol | result | error / tol | accepted | rejected | NFE | wall s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            err = "—" if np.isnan(r[4]) else f"{r[4]:.2g}"
            print(f"| {r[0]} | {r[1]} | {r[2]:g} | {r[3]} | {err} | {r[5]} | {r[6]} | {r[7]} | {r[8]:.2f} |")
        print()
        for name in PROBLEMS if not args.per_sample_only else ():
            rb = next(r[9] for r in rows if r[0] == name)
            print(f"{name}: Radau and BDF at rtol 1e-10 agree to {rb:.2g} × the benchmark tolerance.")
    else:
        for r in rows:
            print(*r, sep="\t")


if __name__ == "__main__":
    main()
