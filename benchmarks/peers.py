"""node_engine against diffrax (JAX, jit) and torchode (torch.compile) on the same problems (issue 17, item 3).

    python benchmarks/peers.py [--rows 1,2,3,4,5] [--reps 11] [--json out.json] [--quick] [--profile]
        [--peers diffrax,torchode] [--root CHECKOUT]

Needs the ``peers`` extra (``pip install .[peers]``: jax, diffrax, torchode) and the ``bench`` one
(the van der Pol problem and its scipy reference come from ``benchmarks/per_sample.py``, the MLP's
weights from ``benchmarks/solvers.py``). Rows (same problem, same tolerances for every solver;
dopri5 with an integral controller — diffrax ``PIDController(pcoeff=0, icoeff=1)``, torchode
``IntegralController``, node_engine's default — safety 0.9, factors 0.2..10, Hairer's initial step):

1. MLP field 2-64-64-2 tanh (``solvers.MLP(2)``'s weights in both frameworks), batch 256, t ∈ [0, 1],
   rtol = atol = 1e-5, float32, forward solve, joint stepping (the batch is one state).
2. van der Pol, batch 256, μ ~ U[0.5, 10] and y0 ~ N(0, 2²) per sample (``per_sample.make_problem``),
   t ∈ [0, 10], rtol = atol = 1e-5, float64, joint stepping: one step size for the whole batch, the
   error norm over the whole state (diffrax: the batch as one state; torchode: the batch flattened
   into one (1, 512) sample).
3. The same problem per sample: node_engine ``options={"step_control": "per_sample"}``, diffrax
   ``jax.vmap`` of a one-sample solve, torchode's own batched solve (per-sample control is its mode).
4. FFJORD-toy CNF gradient: ConcatSquash field 2-64-64-64-2 tanh, exact trace, learned end time,
   batch 512 of two moons, float32, backsolve adjoint with the default norm (diffrax
   ``BacksolveAdjoint``; node_engine ``CNF`` with ``odeint_adjoint``), identical initial weights
   and data; one forward + backward gradient of the mean NLL (no optimizer step).
5. Row 4 with the seminorm in the backward solve (node_engine's training default; diffrax
   ``adjoint_rms_seminorm``).

torchode has no row 4/5 here: its ``BacksolveAdjoint`` vmaps the field per sample and
``JointBacksolveAdjoint`` needs the CNF's tuple state flattened; not written (time-boxed).

Method: every library runs in its own long-lived subprocess (JAX and torch never share one), one
thread each (``torch.set_num_threads(1)``; ``XLA_FLAGS`` single-threaded Eigen and intra-op set
before jax is imported); each contender is warmed up first (its first call, which compiles, is
recorded separately as "first call"), then the parent asks the contenders in turn to run a row
once (round-robin, the order rotating every repetition); medians of ``--reps`` and the spread
(min..max). Ratio = node_engine eager wall / peer wall (< 1: node_engine faster). Errors: final
states against float64 references (scipy DOP853 at rtol = atol = 1e-12 for van der Pol;
node_engine float64 dopri8 at 1e-12 for the MLP); CNF rows: |loss - reference| and the relative
gradient error against a float64 node_engine solve at 1e-9 backpropagated directly.

node_engine variants: ``eager``; ``compile_opt`` (``options={"compile": True}``, only where odeint
accepts it: detected at run time); ``compile_field`` (``node_engine.compile_field`` of the field;
rows 1-3). ``--profile`` adds a torch.profiler breakdown of node_engine's eager row 2 (per trial
step: ops, top ops by self CPU time, the share of wall time outside aten ops).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOL = 1e-5
ROWS = {1: "MLP d=2 B=256 f32", 2: "vdP B=256 f64 joint", 3: "vdP B=256 f64 per-sample",
        4: "CNF grad B=512 f32 backsolve", 5: "CNF grad B=512 f32 backsolve+seminorm"}
VDP_T1 = 10.0
MAX_STEPS = 100_000
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1",
              "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
              "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1"}
CNF_LAYERS = ("W", "c", "a", "a0", "b")  # per ConcatSquash layer: (W x + c) * sigmoid(a t + a0) + b t


# ================================================================== problem data (parent only)
def make_data(path: Path, batch_cnf: int) -> dict:
    """Write every row's inputs to ``path`` (npz) and return the references (float64)."""
    import torch
    from sklearn.datasets import make_moons

    torch.set_num_threads(1)

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    from per_sample import make_problem, references
    from solvers import MLP

    from node_engine import odeint
    from node_engine.models.cnf import CNF
    from node_engine.models.cnf_fields import ConcatSquashField
    from node_engine.specs import SolverSection

    d: dict[str, np.ndarray] = {}
    mlp = MLP(2)
    lin = [m for m in mlp.net if isinstance(m, torch.nn.Linear)]
    for i, m in enumerate(lin):
        d[f"mlp_W{i}"] = m.weight.detach().numpy().astype(np.float32)
        d[f"mlp_b{i}"] = m.bias.detach().numpy().astype(np.float32)
    d["mlp_y0"] = torch.randn(256, 2, generator=torch.Generator().manual_seed(1)).numpy()
    y0, mu = make_problem(256)
    d["vdp_y0"], d["vdp_mu"] = y0.numpy(), mu.numpy()
    torch.manual_seed(0)
    cnf = CNF([ConcatSquashField(2, (64, 64, 64))], 2)
    for k, v in cnf_params_from_torch(cnf).items():
        d["cnf_" + k] = v
    x, _ = make_moons(batch_cnf, noise=0.05, random_state=0)
    x = (x - x.mean(0)) / x.std(0)
    d["cnf_x"] = x.astype(np.float32)
    np.savez(path, **d)

    refs: dict = {}
    with torch.no_grad():
        m64 = mlp.double()
        y = odeint(lambda t, y: m64.net(y), torch.from_numpy(d["mlp_y0"]).double(),
                   torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-12, atol=1e-12, method="dopri8")[-1]
    refs[1] = y.numpy()
    refs[2] = refs[3] = references(y0, mu, VDP_T1)
    # CNF: float64, direct backprop through a 1e-9 solve (the exact gradient of a very accurate solve)
    cnf64 = CNF([ConcatSquashField(2, (64, 64, 64))], 2,
                solver=SolverSection(rtol=1e-9, atol=1e-9, adjoint=False)).double()
    cnf_params_to_torch(cnf64, {k[4:]: d[k] for k in d if k.startswith("cnf_") and k != "cnf_x"})
    loss, grad = cnf_loss_and_grad(cnf64, torch.from_numpy(d["cnf_x"]).double())
    refs[4] = refs[5] = {"loss": loss, "grad": grad}
    return refs


def cnf_param_names(n_layers: int = 4) -> list[str]:
    return [f"{k}{i}" for i in range(n_layers) for k in CNF_LAYERS] + ["rawT"]


def cnf_params_from_torch(cnf) -> dict[str, np.ndarray]:
    block = cnf.blocks[0]
    out = {}
    for i, layer in enumerate(block.field.layers):
        vals = (layer.linear.weight, layer.linear.bias, layer.hyper_gate.weight[:, 0], layer.hyper_gate.bias,
                layer.hyper_bias.weight[:, 0])
        for k, v in zip(CNF_LAYERS, vals):
            out[f"{k}{i}"] = v.detach().cpu().numpy().copy()
    out["rawT"] = block.raw_end_time.detach().cpu().numpy().copy()
    return out


def cnf_params_to_torch(cnf, params: dict) -> None:
    import torch

    block = cnf.blocks[0]
    with torch.no_grad():
        for i, layer in enumerate(block.field.layers):
            for k, p in zip(CNF_LAYERS, (layer.linear.weight, layer.linear.bias, layer.hyper_gate.weight[:, 0],
                                         layer.hyper_gate.bias, layer.hyper_bias.weight[:, 0])):
                p.copy_(torch.from_numpy(np.asarray(params[f"{k}{i}"])))
        block.raw_end_time.copy_(torch.from_numpy(np.asarray(params["rawT"])))


def cnf_torch_grads(cnf, grads) -> dict[str, np.ndarray]:
    """node_engine CNF gradients by canonical name (same layout as ``cnf_params_from_torch``)."""
    by_param = {id(p): g for p, g in zip(cnf.parameters(), grads)}
    block = cnf.blocks[0]
    out = {}
    for i, layer in enumerate(block.field.layers):
        for k, p, col in zip(CNF_LAYERS, (layer.linear.weight, layer.linear.bias, layer.hyper_gate.weight,
                                          layer.hyper_gate.bias, layer.hyper_bias.weight),
                             (False, False, True, False, True)):
            g = by_param[id(p)]
            out[f"{k}{i}"] = (g[:, 0] if col else g).detach().double().numpy()
    out["rawT"] = by_param[id(block.raw_end_time)].detach().double().numpy()
    return out


def cnf_loss_and_grad(cnf, x):
    import torch

    params = list(cnf.parameters())
    loss = -cnf.log_prob(x).mean()
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), cnf_torch_grads(cnf, grads)


def flat(grads: dict) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(grads[k], dtype=np.float64)) for k in cnf_param_names()])


# ================================================================== workers
class Worker:
    """One library in its own process; subclasses define ``build(row, variant) -> callable`` returning
    (result dict) per call, and ``variants(row)``."""

    def __init__(self, data: dict, quick: bool):
        self.d = data
        self.quick = quick
        self.fns: dict[str, object] = {}

    def setup(self, rows):
        out = {}
        for row in rows:
            for v in self.variants(row):
                key = f"{row}:{v}"
                try:
                    fn = self.build(row, v)
                except Unsupported as e:
                    out[key] = {"skipped": str(e)}
                    continue
                start = time.perf_counter()
                res = fn()
                first = time.perf_counter() - start
                start = time.perf_counter()
                res = fn()
                second = time.perf_counter() - start
                for _ in range(0 if self.quick else 2):
                    res = fn()
                self.fns[key] = fn
                out[key] = {"first_s": first, "second_s": second, **res}
        return out

    def run(self, key):
        fn = self.fns[key]
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


class Unsupported(Exception):
    pass


class NodeEngineWorker(Worker):
    name = "node_engine"

    def __init__(self, data, quick):
        super().__init__(data, quick)
        import torch

        torch.set_num_threads(1)
        sys.path.insert(0, os.environ.get("PEERS_NODE_ENGINE_ROOT", str(ROOT)))  # --root
        self.torch = torch
        self.compile_opt = self._compile_option_supported()

    def _compile_option_supported(self) -> bool:
        """Whether ``odeint`` accepts ``options={"compile": True}`` (another branch adds it)."""
        torch = self.torch
        from node_engine import odeint

        try:
            odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 0.1]), options={"compile": True})
            return True
        except (ValueError, TypeError):  # unknown option: this checkout predates it
            return False
        except Exception as e:  # accepted but failed (e.g. no C++ compiler): report, run without it
            print(f"options={{'compile': True}} failed: {e!r}", file=sys.stderr)
            return False

    def variants(self, row):
        if row in (4, 5):
            return ["eager"]
        return ["eager", "compile_opt", "compile_field"]

    def build(self, row, variant):
        torch = self.torch
        from node_engine import SolverStats, compile_field, odeint

        if variant == "compile_opt" and not self.compile_opt:
            raise Unsupported("odeint does not accept options={'compile': True} in this checkout")
        if self.quick and variant == "compile_field":
            raise Unsupported("--quick")
        d = self.d
        opts: dict = {"max_num_steps": MAX_STEPS}
        if variant == "compile_opt":
            opts["compile"] = True
        if row == 1:
            ws = [(torch.from_numpy(d[f"mlp_W{i}"]), torch.from_numpy(d[f"mlp_b{i}"])) for i in range(3)]

            def field(t, y):
                h = torch.tanh(torch.addmm(ws[0][1], y, ws[0][0].t()))
                h = torch.tanh(torch.addmm(ws[1][1], h, ws[1][0].t()))
                return torch.addmm(ws[2][1], h, ws[2][0].t())

            y0 = torch.from_numpy(d["mlp_y0"])
            t = torch.tensor([0.0, 1.0])
        elif row in (2, 3):
            mu = torch.from_numpy(d["vdp_mu"])
            y0 = torch.from_numpy(d["vdp_y0"])
            t = torch.tensor([0.0, VDP_T1], dtype=torch.float64)
            if row == 2:
                def field(t, y):
                    x, v = y[:, 0], y[:, 1]
                    return torch.stack([v, mu * (1 - x * x) * v - x], 1)
            else:
                opts["step_control"] = "per_sample"
                y0 = (y0, mu)  # μ rides along (dμ/dt = 0) so it follows its row when finished rows leave

                def field(t, state):
                    y, m = state
                    x, v = y[:, 0], y[:, 1]
                    return torch.stack([v, m * (1 - x * x) * v - x], 1), torch.zeros_like(m)
        else:
            return self._build_cnf(row)
        if variant == "compile_field":
            field = compile_field(field, dynamic=True if row == 3 else None)

        def call():
            stats = SolverStats()
            with torch.no_grad():
                ys = odeint(field, y0, t, rtol=TOL, atol=TOL, method="dopri5", options=opts, stats=stats)
            y = ys[0][-1] if row == 3 else ys[-1]
            res = {"y": y.double().numpy().tolist(), "nfe": stats.nfe_forward,
                   "steps": stats.steps_accepted + stats.steps_rejected}
            if row == 3:
                res["sample_evals"] = stats.sample_evaluations
                res["steps"] = res["steps"] / y.shape[0]
            return res

        return call

    def _build_cnf(self, row):
        torch = self.torch
        from node_engine.models.cnf import CNF
        from node_engine.models.cnf_fields import ConcatSquashField
        from node_engine.specs import SolverSection

        torch.manual_seed(0)
        cnf = CNF([ConcatSquashField(2, (64, 64, 64))], 2,
                  solver=SolverSection(rtol=TOL, atol=TOL, adjoint=True, adjoint_mode="backsolve",
                                       adjoint_norm="seminorm" if row == 5 else "default"))
        cnf_params_to_torch(cnf, {k[4:]: v for k, v in self.d.items() if k.startswith("cnf_") and k != "cnf_x"})
        x = torch.from_numpy(self.d["cnf_x"])

        def call():
            cnf.stats.reset()
            loss, grad = cnf_loss_and_grad(cnf, x)
            return {"loss": loss, "grad": {k: v.tolist() for k, v in grad.items()},
                    "nfe": cnf.stats.nfe_forward, "nfe_bwd": cnf.stats.nfe_backward,
                    "steps": cnf.stats.steps_accepted + cnf.stats.steps_rejected}  # forward + backward

        return call

    def profile(self):
        """torch.profiler over one eager row-2 solve: per trial step op counts and top ops."""
        from torch.profiler import ProfilerActivity, profile

        fn = self.fns.get("2:eager") or self.build(2, "eager")
        res = fn()
        walls = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            walls.append(time.perf_counter() - start)
        wall = statistics.median(walls)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            fn()
            prof_wall = time.perf_counter() - start
        ev = prof.key_averages()
        # top-level aten ops only (self time excludes children; counts of every aten op)
        aten = [e for e in ev if e.key.startswith("aten::")]
        steps = res["steps"]
        total_self = sum(e.self_cpu_time_total for e in aten) * 1e-6
        calls = sum(e.count for e in aten)
        # top-level ops: what the Python code calls (nested ones, e.g. select -> as_strided, excluded)
        top_level = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
        top = sorted(aten, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        return {"steps": steps, "nfe": res["nfe"], "wall_s": wall, "profiled_wall_s": prof_wall,
                "aten_self_s": total_self, "aten_calls_per_step": calls / steps,
                "top_level_calls_per_step": top_level / steps,
                "top": [{"op": e.key, "calls_per_step": e.count / steps,
                         "self_us_per_step": e.self_cpu_time_total / steps,
                         "share": e.self_cpu_time_total * 1e-6 / total_self} for e in top]}


class DiffraxWorker(Worker):
    name = "diffrax"

    def __init__(self, data, quick):
        super().__init__(data, quick)
        import diffrax
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
        self.jax, self.jnp, self.dfx = jax, jnp, diffrax

    def variants(self, row):
        return ["jit"]

    def controller(self, seminorm=False):
        dfx = self.dfx
        kw = {"norm": dfx.adjoint_rms_seminorm} if seminorm else {}
        return dfx.PIDController(rtol=TOL, atol=TOL, pcoeff=0.0, icoeff=1.0, **kw)

    def build(self, row, variant):
        jax, jnp, dfx = self.jax, self.jnp, self.dfx
        d = self.d
        if row in (4, 5):
            return self._build_cnf(row)
        if row == 1:
            args = tuple(jnp.asarray(d[f"mlp_{k}{i}"]) for i in range(3) for k in ("W", "b"))

            def field(t, y, a):
                h = jnp.tanh(y @ a[0].T + a[1])
                h = jnp.tanh(h @ a[2].T + a[3])
                return h @ a[4].T + a[5]

            y0 = jnp.asarray(d["mlp_y0"])
            t0, t1 = jnp.float32(0.0), jnp.float32(1.0)
        else:
            def field(t, y, mu):
                x, v = y[..., 0], y[..., 1]
                return jnp.stack([v, mu * (1 - x * x) * v - x], -1)

            y0, args = jnp.asarray(d["vdp_y0"]), jnp.asarray(d["vdp_mu"])
            t0, t1 = 0.0, VDP_T1
        term, solver = dfx.ODETerm(field), dfx.Dopri5()

        def solve(y0, args):
            sol = dfx.diffeqsolve(term, solver, t0, t1, None, y0, args=args, stepsize_controller=self.controller(),
                                  saveat=dfx.SaveAt(t1=True), max_steps=MAX_STEPS)
            return sol.ys[-1], sol.stats["num_steps"], sol.stats["num_accepted_steps"]

        fn = jax.jit(jax.vmap(solve) if row == 3 else solve)

        def call():
            y, steps, acc = jax.block_until_ready(fn(y0, args))
            steps = np.asarray(steps)
            res = {"y": np.asarray(y, dtype=np.float64).tolist(), "dtype": str(y.dtype)}
            if row == 3:  # vmap of a while loop: every iteration evaluates all rows until the last is done
                res.update(steps=float(steps.mean()), steps_max=int(steps.max()),
                           sample_evals=int(steps.max()) * 6 * steps.size)
            else:
                res.update(steps=int(steps), nfe=int(steps) * 6 + 3)
            return res

        return call

    def _build_cnf(self, row):
        jax, jnp, dfx = self.jax, self.jnp, self.dfx
        names = cnf_param_names()
        params = {k: jnp.asarray(self.d["cnf_" + k]) for k in names}
        x = jnp.asarray(self.d["cnf_x"])
        n_layers = 4

        def field(p, t, z):  # z (2,): one sample
            h = z
            for i in range(n_layers):
                h = (p[f"W{i}"] @ h + p[f"c{i}"]) * jax.nn.sigmoid(p[f"a{i}"] * t + p[f"a0{i}"]) + p[f"b{i}"] * t
                if i < n_layers - 1:
                    h = jnp.tanh(h)
            return h

        def dynamics(s, state, p):
            z, _ = state
            T = jax.nn.softplus(p["rawT"])
            t = T * (1.0 - s)

            def f_and_trace(zz):
                fz, lin = jax.linearize(lambda q: field(p, t, q), zz)
                jac = jax.vmap(lin)(jnp.eye(zz.shape[0], dtype=zz.dtype))  # rows J e_i (transposed J)
                return fz, jnp.trace(jac)

            f, tr = jax.vmap(f_and_trace)(z)
            return -T * f, T * tr

        ctrl = self.controller()
        adjoint = dfx.BacksolveAdjoint(stepsize_controller=self.controller(seminorm=row == 5))

        def loss_fn(p, x):
            state0 = (x, jnp.zeros(x.shape[0], x.dtype))
            sol = dfx.diffeqsolve(dfx.ODETerm(dynamics), dfx.Dopri5(), jnp.float32(0.0), jnp.float32(1.0), None,
                                  state0, args=p, stepsize_controller=ctrl, adjoint=adjoint,
                                  saveat=dfx.SaveAt(t1=True), max_steps=MAX_STEPS)
            z, delta = sol.ys[0][-1], sol.ys[1][-1]
            logp = -0.5 * jnp.sum(z * z, 1) - z.shape[1] * 0.5 * jnp.log(2 * jnp.pi) - delta
            return -jnp.mean(logp), sol.stats["num_steps"]

        fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

        def call():
            (loss, steps), grad = jax.block_until_ready(fn(params, x))
            return {"loss": float(loss), "grad": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in grad.items()},
                    "steps": int(steps), "nfe": int(steps) * 6 + 3, "dtype": str(loss.dtype)}

        return call


class TorchodeWorker(Worker):
    name = "torchode"

    def __init__(self, data, quick):
        super().__init__(data, quick)
        import torch
        import torchode

        torch.set_num_threads(1)
        self.torch, self.to = torch, torchode

    def variants(self, row):
        return ["compile"] if row in (1, 2, 3) else []

    def build(self, row, variant):
        torch, to = self.torch, self.to
        d = self.d
        if row == 1:
            ws = [(torch.from_numpy(d[f"mlp_W{i}"]), torch.from_numpy(d[f"mlp_b{i}"])) for i in range(3)]
            y0 = torch.from_numpy(d["mlp_y0"])
            batch, t1 = y0.shape[0], 1.0

            def field(t, y):  # joint: the batch flattened into one (1, 512) sample
                h = torch.tanh(torch.addmm(ws[0][1], y.reshape(batch, 2), ws[0][0].t()))
                h = torch.tanh(torch.addmm(ws[1][1], h, ws[1][0].t()))
                return torch.addmm(ws[2][1], h, ws[2][0].t()).reshape(1, -1)
        else:
            mu = torch.from_numpy(d["vdp_mu"])
            y0 = torch.from_numpy(d["vdp_y0"])
            batch, t1 = y0.shape[0], VDP_T1

            def field(t, y):  # row 2: (1, 2B) flattened; row 3: (B, 2) (torchode evaluates every row)
                yy = y.reshape(batch, 2)
                x, v = yy[:, 0], yy[:, 1]
                return torch.stack([v, mu * (1 - x * x) * v - x], 1).reshape(y.shape)
        y_start = y0.reshape(1, -1) if row in (1, 2) else y0
        n = y_start.shape[0]
        t_eval = torch.tensor([0.0, t1], dtype=y0.dtype).expand(n, 2)
        term = to.ODETerm(field)
        method = to.Dopri5(term=term)
        ctrl = to.IntegralController(atol=TOL, rtol=TOL, term=term)
        adjoint = to.AutoDiffAdjoint(method, ctrl, max_steps=MAX_STEPS)
        # torch.compile(adjoint) would return a module whose .solve is the uncompiled method
        # (AutoDiffAdjoint 1.0.1 has no forward), so the solve method itself is compiled
        solve = torch.compile(adjoint.solve)

        def call():
            with torch.no_grad():
                sol = solve(to.InitialValueProblem(y0=y_start, t_eval=t_eval))
            y = sol.ys[:, -1].reshape(batch, 2)
            steps = sol.stats["n_steps"].double()
            res = {"y": y.double().numpy().tolist(), "status": int(sol.status.max())}
            if row == 3:  # the loop runs until the last row is done, evaluating all rows
                res.update(steps=float(steps.mean()), steps_max=int(steps.max()),
                           sample_evals=int(sol.stats["n_f_evals"].max()) * batch)
            else:
                res.update(steps=int(steps.max()), nfe=int(sol.stats["n_f_evals"].max()))
            return res

        return call


WORKERS = {"node_engine": NodeEngineWorker, "diffrax": DiffraxWorker, "torchode": TorchodeWorker}


def worker_main(name: str, data_path: str, quick: bool) -> None:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to the log, not the protocol
    data = dict(np.load(data_path))
    w = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "init":
                w = WORKERS[name](data, quick)
                reply = {"ok": True, "info": {"compile_opt": getattr(w, "compile_opt", None)}}
            elif msg["cmd"] == "setup":
                reply = {"ok": True, "setup": w.setup(msg["rows"])}
            elif msg["cmd"] == "run":
                reply = {"ok": True, "wall": w.run(msg["key"])}
            elif msg["cmd"] == "profile":
                reply = {"ok": True, "profile": w.profile()}
            else:
                break
        except Exception:  # reported to the parent, which stops
            reply = {"ok": False, "error": traceback.format_exc()}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ================================================================== parent
class Client:
    def __init__(self, name: str, data_path: Path, log: Path, quick: bool, root: Path = ROOT):
        env = {**os.environ, **THREAD_ENV, "PYTHONPATH": str(root), "PEERS_NODE_ENGINE_ROOT": str(root)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--data", str(data_path)]
        if quick:
            cmd.append("--quick")
        self.name, self.log = name, log
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"),
                                     text=True, env=env)

    def call(self, **msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died; log {self.log}:\n" + self.log.read_text()[-3000:])
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"worker {self.name}: {reply['error']}")
        return reply

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=60)


def errors(row, res, refs):
    if row in (4, 5):
        ref = refs[row]
        g, gr = flat(res["grad"]), flat(ref["grad"])
        return {"loss": res["loss"], "loss_err": abs(res["loss"] - ref["loss"]),
                "grad_rel_err": float(np.linalg.norm(g - gr) / np.linalg.norm(gr))}
    e = np.abs(np.asarray(res["y"]) - refs[row]).max(axis=1)
    return {"err_max": float(e.max()), "err_median": float(np.median(e))}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("torch", "jax", "jaxlib", "diffrax", "equinox", "torchode", "numpy", "scipy"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,2,3,4,5", help="comma-separated row numbers (1-5)")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 reps, CNF batch 64, no compile_field")
    ap.add_argument("--profile", action="store_true", help="torch.profiler breakdown of node_engine's row 2")
    ap.add_argument("--peers", default="diffrax,torchode")
    ap.add_argument("--root", default=str(ROOT),
                    help="checkout whose node_engine the node_engine worker imports (default: this one)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker, args.data, args.quick)
    rows = [int(r) for r in args.rows.split(",")]
    reps = 2 if args.quick else args.reps
    tmp = Path(tempfile.mkdtemp(prefix="peers-"))
    t_start = time.time()
    print(f"references and data ({tmp}) ...", flush=True)
    refs = make_data(tmp / "data.npz", 64 if args.quick else 512)
    names = ["node_engine"] + [p for p in args.peers.split(",") if p]
    root = Path(args.root).resolve()
    clients = {n: Client(n, tmp / "data.npz", tmp / f"{n}.log", args.quick, root) for n in names}
    results: dict = {"rows": {}, "versions": versions(), "reps": reps, "load_before": os.getloadavg(),
                     "node_engine_root": str(root)}
    try:
        info = {n: c.call(cmd="init")["info"] for n, c in clients.items()}
        results["compile_opt_supported"] = info["node_engine"]["compile_opt"]
        setup = {}
        for n, c in clients.items():
            print(f"warming up {n} ...", flush=True)
            start = time.perf_counter()
            setup[n] = c.call(cmd="setup", rows=rows)["setup"]
            print(f"  {time.perf_counter() - start:.0f} s", flush=True)
        contenders = {r: [(n, key.split(":")[1]) for n in names for key, v in setup[n].items()
                          if int(key.split(":")[0]) == r and "skipped" not in v] for r in rows}
        walls = {(r, n, v): [] for r in rows for n, v in contenders[r]}
        for rep in range(reps):
            for r in rows:
                order = contenders[r][rep % len(contenders[r]):] + contenders[r][: rep % len(contenders[r])]
                for n, v in order:
                    walls[(r, n, v)].append(clients[n].call(cmd="run", key=f"{r}:{v}")["wall"])
            print(f"rep {rep + 1}/{reps} done", flush=True)
        if args.profile:
            results["profile"] = clients["node_engine"].call(cmd="profile")["profile"]
    finally:
        for c in clients.values():
            c.close()
    results["load_after"] = os.getloadavg()
    results["elapsed_s"] = time.time() - t_start
    for r in rows:
        base = statistics.median(walls[(r, "node_engine", "eager")])
        entries = []
        for n, v in contenders[r]:
            w = walls[(r, n, v)]
            s = setup[n][f"{r}:{v}"]
            med = statistics.median(w)
            e = {"lib": n, "variant": v, "median_s": med, "min_s": min(w), "max_s": max(w),
                 "ne_over_this": base / med, "first_s": s["first_s"], "second_s": s["second_s"],
                 **{k: s[k] for k in ("nfe", "nfe_bwd", "steps", "steps_max", "sample_evals", "dtype", "status")
                    if k in s},
                 **errors(r, s, refs)}
            # the ratio's spread: best and worst pairing of node_engine eager's extremes with this one's
            ne = walls[(r, "node_engine", "eager")]
            e["ratio_lo"], e["ratio_hi"] = min(ne) / max(w), max(ne) / min(w)
            entries.append(e)
        skipped = {f"{n}:{k}": v["skipped"] for n in names for k, v in setup[n].items()
                   if "skipped" in v and int(k.split(":")[0]) == r}
        results["rows"][r] = {"name": ROWS[r], "entries": entries, "skipped": skipped}
    shutil.rmtree(tmp, ignore_errors=True)  # kept (with the workers' logs) when a worker failed
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


def fmt(x, spec=".2f"):
    return "" if x is None else format(x, spec)


def print_tables(results):
    print(f"\nversions: {results['versions']}; reps {results['reps']}; load {results['load_before']} -> "
          f"{results['load_after']}; {results['elapsed_s']:.0f} s")
    print("\n| row | solver | median ms (min..max) | node_engine eager / this (spread) | first call s | "
          "steps | NFE | error |")
    print("|---|---|---|---|---|---|---|---|")
    for r, row in results["rows"].items():
        for e in row["entries"]:
            if "grad_rel_err" in e:
                err = f"loss {e['loss']:.5f} (Δ {e['loss_err']:.1e}), grad rel {e['grad_rel_err']:.1e}"
                nfe = f"{e.get('nfe')} / {e.get('nfe_bwd', '?')}"
            else:
                err = f"max {e['err_max']:.1e}, median {e['err_median']:.1e}"
                nfe = str(e.get("nfe", "")) if "sample_evals" not in e else f"{e['sample_evals']} sample-evals"
            steps = e.get("steps", "")
            if isinstance(steps, float):
                steps = f"{steps:.1f} mean" + (f", {e['steps_max']} max" if "steps_max" in e else "")
            print(f"| {r}. {row['name']} | {e['lib']} {e['variant']} | {e['median_s'] * 1e3:.1f} "
                  f"({e['min_s'] * 1e3:.1f}..{e['max_s'] * 1e3:.1f}) | {e['ne_over_this']:.2f} "
                  f"({e['ratio_lo']:.2f}..{e['ratio_hi']:.2f}) | {e['first_s']:.2f} | {steps} | {nfe} | {err} |")
        for k, v in row["skipped"].items():
            print(f"| {r}. {row['name']} | {k} | skipped: {v} | | | | | |")
    rows = results["rows"]
    if 2 in rows and 3 in rows:
        med = {r: {(e["lib"], e["variant"]): e["median_s"] for e in rows[r]["entries"]} for r in (2, 3)}
        for k in med[3]:
            if k in med[2]:
                print(f"\nrow 3 / row 2 (per-sample / joint wall), {k[0]} {k[1]}: {med[3][k] / med[2][k]:.2f}")
    p = results.get("profile")
    if p:
        print(f"\nprofile of node_engine eager row 2: {p['steps']} trial steps, {p['nfe']} NFE, wall "
              f"{p['wall_s'] * 1e3:.0f} ms ({p['wall_s'] / p['steps'] * 1e6:.0f} us/step; profiled "
              f"{p['profiled_wall_s'] * 1e3:.0f} ms), aten ops per step {p['aten_calls_per_step']:.0f} "
              f"({p.get('top_level_calls_per_step', float('nan')):.0f} called from Python, the rest nested), "
              f"aten self time {p['aten_self_s'] * 1e3:.0f} ms = {p['aten_self_s'] / p['profiled_wall_s']:.0%} "
              f"of the profiled wall")
        print("| op | calls/step | self us/step | share of aten self time |")
        print("|---|---|---|---|")
        for t in p["top"]:
            print(f"| {t['op']} | {t['calls_per_step']:.1f} | {t['self_us_per_step']:.1f} | {t['share']:.0%} |")


if __name__ == "__main__":
    main()
