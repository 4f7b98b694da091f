"""CNF training throughput and adjoint cost: node_engine vs a torchdiffeq reference loop (issue 6,
items 3 and 4), side by side in one process.

    python benchmarks/cnf_training.py [--iters 6] [--batch 512] [--threads 1] [--device cuda] [--pretrain 200] [--field-reps 30]
        [--weights pretrained.safetensors]

Model: FFJORD's toy configuration — one ConcatSquash field 2-64-64-64-2, tanh, exact trace,
learned end time T = softplus(θ) (initial 1), dopri5 at rtol = atol = 1e-5, Adam lr 1e-3, batch
512 of two moons (scikit-learn ``make_moons(noise=0.05)``, standardized), float32.

- ours: ``node_engine.models.cnf.CNF`` trained with ``odeint_adjoint`` (backsolve, seminorm — the
  default of training jobs); its exact trace comes from forward-mode tangents
  (``ConcatSquashField.jacobian_trace``), not from D autograd VJPs.
- reference: a small independent CNF written here on torchdiffeq 0.2.5 (``odeint_adjoint``,
  default norm, FFJORD-style exact divergence with ``create_graph=True``), with the *same weights*
  (copied from ours at step 0), the same batches, the same tolerances.

Iterations alternate between the two loops (ours, reference, ours, ...). Reported: median seconds
per iteration and iterations/s, forward/backward NFE per iteration, and the test NLL (nats, 4096
held-out points, evaluated at 1e-5 by each library) after the same number of iterations.

Field rows (``--field-reps``): one evaluation of f and its exact trace at batch 512, without
gradient (the forward solve) and with the VJP wrt (z, parameters) that the adjoint's backward solve
takes, four ways: the fused forward-mode node, forward-mode as plain autograd ops, D autograd VJPs
with ``create_graph`` (the generic path, as FFJORD and the reference do), and the D VJPs batched in
one ``autograd.grad(..., is_grads_batched=True)``.

Adjoint cost rows: for the same weights (at step 0 and after training), the gradient of the mean
NLL of one batch by (a) node_engine seminorm, (b) node_engine default norm, (c) torchdiffeq default
adjoint, (d) torchdiffeq seminorm: backward NFE and the relative difference of the full gradient
against a float64 node_engine checkpoint-adjoint gradient at 1e-9 (the exact gradient of a very
accurate solve).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import clock  # benchmarks/clock.py, beside this script
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from sklearn.datasets import make_moons
from torch import nn

import torchdiffeq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from node_engine.models.cnf import CNF, standard_normal_log_prob  # noqa: E402

TOL = 1e-5


# ---- the reference CNF on torchdiffeq (independent of node_engine) -------------------------------
class RefConcatSquash(nn.Module):
    """y = (W x + c) * sigmoid(a t + a0) + b t (FFJORD ConcatSquashLinear)."""

    def __init__(self, din, dout):
        super().__init__()
        self.linear = nn.Linear(din, dout)
        self.hyper_gate = nn.Linear(1, dout)
        self.hyper_bias = nn.Linear(1, dout, bias=False)

    def forward(self, t, x):
        tt = t.reshape(1, 1).to(x.dtype)
        return self.linear(x) * torch.sigmoid(self.hyper_gate(tt)) + self.hyper_bias(tt)


class RefODEFunc(nn.Module):
    """d/ds (z, Δ) = (-T f(T(1-s), z), T tr ∂f/∂z) on s ∈ [0, 1] (data -> base), exact trace."""

    def __init__(self, dims=(2, 64, 64, 64, 2)):
        super().__init__()
        self.layers = nn.ModuleList(RefConcatSquash(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.raw_T = nn.Parameter(torch.tensor(0.0))
        self.calls = 0

    def net(self, t, z):
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = torch.tanh(h)
        return h

    def forward(self, s, state):
        self.calls += 1
        z = state[0]
        T = F.softplus(self.raw_T)
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.requires_grad_(True)
            f = self.net(T * (1 - s), z)
            div = sum(torch.autograd.grad(f[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(z.shape[1]))
        return -T * f, T * div


def ref_log_prob(func: RefODEFunc, x, *, tol=TOL, adjoint=True, adjoint_options=None):
    s = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
    state = (x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
    if adjoint:
        z, delta = torchdiffeq.odeint_adjoint(func, state, s, rtol=tol, atol=tol, method="dopri5",
                                              adjoint_options=adjoint_options)
    else:
        z, delta = torchdiffeq.odeint(func, state, s, rtol=tol, atol=tol, method="dopri5")
    return standard_normal_log_prob(z[-1]) - delta[-1]


def copy_weights(ours: CNF, ref: RefODEFunc) -> None:
    block = ours.blocks[0]
    with torch.no_grad():
        ref.raw_T.copy_(block.raw_end_time)
        for lo, lr in zip(block.field.layers, ref.layers):
            lr.linear.weight.copy_(lo.linear.weight)
            lr.linear.bias.copy_(lo.linear.bias)
            lr.hyper_gate.weight.copy_(lo.hyper_gate.weight)
            lr.hyper_gate.bias.copy_(lo.hyper_gate.bias)
            lr.hyper_bias.weight.copy_(lo.hyper_bias.weight)


def ours_params(ours: CNF):
    block = ours.blocks[0]
    out = [block.raw_end_time]
    for lo in block.field.layers:
        out += [lo.linear.weight, lo.linear.bias, lo.hyper_gate.weight, lo.hyper_gate.bias, lo.hyper_bias.weight]
    return out


def ref_params(ref: RefODEFunc):
    out = [ref.raw_T]
    for lr in ref.layers:
        out += [lr.linear.weight, lr.linear.bias, lr.hyper_gate.weight, lr.hyper_gate.bias, lr.hyper_bias.weight]
    return out


def moons(n, seed):
    x, _ = make_moons(n_samples=n, noise=0.05, random_state=seed)
    return x


def make_ours(seed=0, norm="seminorm"):
    torch.manual_seed(seed)
    return CNF.from_spec(
        {"type": "cnf", "hidden_dims": [64, 64, 64], "nonlinearity": "tanh", "trace_estimator": "exact"},
        {"method": "dopri5", "rtol": TOL, "atol": TOL, "adjoint": True, "adjoint_norm": norm}, dim=2)


def gradient_rows(ours: CNF, xb: torch.Tensor, label: str):
    """Backward NFE and gradient error of one mean-NLL gradient, four ways."""
    # float64 reference gradient: checkpoint adjoint (exact gradient of the discrete solve) at 1e-9
    o64 = copy.deepcopy(ours).double()
    o64.solver = type(o64.solver)(method="dopri5", rtol=1e-9, atol=1e-9, adjoint=True, adjoint_mode="checkpoint")
    loss = -o64.log_prob(xb.double()).mean()
    g_ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ours_params(o64))]).float()
    rows = []
    for name in ("ours seminorm", "ours default norm", "torchdiffeq default", "torchdiffeq seminorm"):
        if name.startswith("ours"):
            m = copy.deepcopy(ours)
            m.solver = type(m.solver)(method="dopri5", rtol=TOL, atol=TOL, adjoint=True,
                                      adjoint_norm="seminorm" if "semi" in name else "default")
            m.stats.reset()
            start = clock.now()
            loss = -m.log_prob(xb).mean()
            nfe_f = m.stats.nfe_forward
            g = torch.autograd.grad(loss, ours_params(m))
            wall = clock.now() - start
            nfe_b = m.stats.nfe_backward
        else:
            ref = RefODEFunc().to(xb.device)
            copy_weights(ours, ref)
            start = clock.now()
            loss = -ref_log_prob(ref, xb, adjoint_options=dict(norm="seminorm") if "semi" in name else None).mean()
            nfe_f = ref.calls
            g = torch.autograd.grad(loss, ref_params(ref))
            wall = clock.now() - start
            nfe_b = ref.calls - nfe_f
        gv = torch.cat([x.reshape(-1) for x in g])
        rows.append((label, name, nfe_f, nfe_b, float((gv - g_ref).norm() / g_ref.norm()), wall, gv))
    return rows


def field_rows(reps: int, batch: int, dev: torch.device):
    """Median µs of one exact-trace evaluation (no grad / with the adjoint's VJP), interleaved."""
    from node_engine.models.cnf_fields import ConcatSquashField
    from node_engine.models.cnf_divergence import divergence_exact

    torch.manual_seed(0)
    field = ConcatSquashField(2, (64, 64, 64), "tanh").to(dev)
    params = tuple(field.parameters())
    z0 = torch.randn(batch, 2, device=dev)
    t = torch.tensor(0.4, device=dev)
    a, a_div = torch.randn(batch, 2, device=dev), torch.randn(batch, device=dev)
    eye = torch.eye(2, device=dev).unsqueeze(1).expand(2, batch, 2)

    def forward_mode(fused):
        def run(with_vjp):
            ConcatSquashField.fused_tangents = fused
            z = z0.detach().requires_grad_(with_vjp)
            with torch.set_grad_enabled(with_vjp):
                f, div, _ = field.jacobian_trace(t, z)
            if with_vjp:
                torch.autograd.grad((f, div), (z,) + params, (a, a_div))
        return run

    def vjps(batched):
        def run(with_vjp):
            with torch.enable_grad():
                z = z0.detach().requires_grad_(True)
                f = field(t, z)
                if batched:
                    rows = torch.autograd.grad(f, z, eye, is_grads_batched=True, create_graph=with_vjp)[0]
                    div = rows.diagonal(dim1=0, dim2=2).sum(dim=1)
                else:
                    div, _ = divergence_exact(f, z, create_graph=with_vjp)
                if with_vjp:
                    torch.autograd.grad((f, div), (z,) + params, (a, a_div))
        return run

    ways = {"forward-mode, fused node (ours)": forward_mode(True),
            "forward-mode, autograd ops": forward_mode(False),
            "D VJPs, create_graph (generic / FFJORD)": vjps(False),
            "D VJPs batched (is_grads_batched)": vjps(True)}
    times = {(k, v): [] for k in ways for v in (False, True)}
    plain = []
    for r in range(reps):
        order = list(ways.items()) if r % 2 == 0 else list(ways.items())[::-1]
        start = clock.now()
        with torch.no_grad():
            field(t, z0)
        plain.append(clock.now() - start)
        for name, run in order:
            for with_vjp in (False, True):
                start = clock.now()
                run(with_vjp)
                times[(name, with_vjp)].append(clock.now() - start)
    ConcatSquashField.fused_tangents = True
    base = statistics.median(plain)
    print(f"\nOne exact-trace evaluation, batch {batch}, medians of {reps} interleaved rounds "
          f"(plain f alone: {base * 1e6:.0f} µs)\n")
    print("| way | f + trace, no grad [µs] | x plain f | f + trace + VJP [µs] | x plain f |")
    print("|---|---|---|---|---|")
    for name in ways:
        nf, wv = statistics.median(times[(name, False)]), statistics.median(times[(name, True)])
        print(f"| {name} | {nf * 1e6:.0f} | {nf / base:.1f} | {wv * 1e6:.0f} | {wv / base:.1f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--test", type=int, default=4096)
    ap.add_argument("--pretrain", type=int, default=0, help="node_engine iterations before the comparison")
    ap.add_argument("--pretrain-lr", type=float, default=1e-2)
    ap.add_argument("--field-reps", type=int, default=0, help="also time one field evaluation, four ways")
    ap.add_argument("--weights", type=Path, default=None,
                    help="cache of the pretrained weights: loaded if the file exists, else written after pretraining")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = clock.use_device(args.device)
    if args.field_reps:
        field_rows(args.field_reps, args.batch, dev)

    train = moons(20000, 0)
    mean, std = train.mean(0), train.std(0)
    train = torch.tensor((train - mean) / std, dtype=torch.float32, device=dev)
    test = torch.tensor((moons(args.test, 1) - mean) / std, dtype=torch.float32, device=dev)
    g = torch.Generator().manual_seed(0)
    batches = [train[torch.randint(0, len(train), (args.batch,), generator=g).to(dev)] for _ in range(args.iters)]

    ours = make_ours().to(dev)
    if args.weights is not None and args.weights.exists():
        ours.load_state_dict(safetensors.torch.load_file(args.weights))
        print(f"loaded pretrained weights from {args.weights}", flush=True)
    elif args.pretrain:
        # start both loops from weights with non-trivial dynamics (at initialisation the flow is
        # nearly the identity and every solve takes the minimum number of steps)
        opt = torch.optim.Adam(ours.parameters(), lr=args.pretrain_lr)
        gp = torch.Generator().manual_seed(1)
        for i in range(args.pretrain):
            opt.zero_grad()
            (-ours.log_prob(train[torch.randint(0, len(train), (args.batch,), generator=gp).to(dev)]).mean()).backward()
            opt.step()
        ours.stats.reset()
        print(f"pretrained {args.pretrain} iterations (lr {args.pretrain_lr}); NFE now {ours.stats.nfe_forward}",
              flush=True)
        ours = copy.deepcopy(ours)
        if args.weights is not None:
            safetensors.torch.save_file({k: v.cpu().contiguous() for k, v in ours.state_dict().items()}, args.weights)
    ref = RefODEFunc().to(dev)
    copy_weights(ours, ref)
    opt_o = torch.optim.Adam(ours.parameters(), lr=1e-3)
    opt_r = torch.optim.Adam(ref.parameters(), lr=1e-3)
    start = (f"start ({args.weights.name})" if args.weights is not None and args.weights.exists() and not args.pretrain
             else f"start (after {args.pretrain} pretraining it)")
    grad_rows = gradient_rows(ours, batches[0], start)

    t_o, t_r, nfe_o, nfe_r = [], [], [], []
    for it, xb in enumerate(batches):
        for who in (("ours", "ref") if it % 2 == 0 else ("ref", "ours")):
            start = clock.now()
            if who == "ours":
                ours.train()
                ours.stats.reset()
                opt_o.zero_grad()
                loss = -ours.log_prob(xb).mean()
                loss.backward()
                opt_o.step()
                t_o.append(clock.now() - start)
                nfe_o.append((ours.stats.nfe_forward, ours.stats.nfe_backward))
            else:
                ref.calls = 0
                opt_r.zero_grad()
                loss = -ref_log_prob(ref, xb).mean()
                nf = ref.calls
                loss.backward()
                opt_r.step()
                t_r.append(clock.now() - start)
                nfe_r.append((nf, ref.calls - nf))
        print(f"iter {it}: ours {t_o[-1]:.2f}s nfe {nfe_o[-1]}  ref {t_r[-1]:.2f}s nfe {nfe_r[-1]}", flush=True)

    ours.eval()
    with torch.no_grad():
        nll_o = float(-ours.log_prob(test).mean())
        nll_r = float(-ref_log_prob(ref, test, adjoint=False).mean())
    grad_rows += gradient_rows(ours, batches[-1], f"after {args.iters} iterations")

    mo, mr = statistics.median(t_o), statistics.median(t_r)
    print()
    print(f"FFJORD toy CNF (2-64-64-64-2 ConcatSquash, tanh, exact trace, dopri5 rtol=atol={TOL:g}), moons, batch "
          f"{args.batch}, {args.iters} iterations each, interleaved, device {dev}, threads={args.threads}")
    print()
    print("| loop | s / iteration (median) | iterations / s | speed-up (ours/ref it/s) | NFE fwd / bwd per iteration (median) "
          f"| test NLL after {args.iters} it [nats] |")
    print("|---|---|---|---|---|---|")
    med = lambda xs, i: int(statistics.median(x[i] for x in xs))  # noqa: E731
    print(f"| node_engine (seminorm adjoint) | {mo:.2f} | {1 / mo:.3f} | {mr / mo:.2f} | {med(nfe_o, 0)} / {med(nfe_o, 1)} "
          f"| {nll_o:.4f} |")
    print(f"| torchdiffeq reference (default adjoint) | {mr:.2f} | {1 / mr:.3f} | 1.00 | {med(nfe_r, 0)} / {med(nfe_r, 1)} "
          f"| {nll_r:.4f} |")
    print(f"\n|test NLL ours - ref| = {abs(nll_o - nll_r):.4f} nats")
    print(f"whole run: ours {sum(t_o):.1f} s, reference {sum(t_r):.1f} s for {args.iters} iterations each: "
          f"speed-up {sum(t_r) / sum(t_o):.2f}; NFE fwd+bwd ours {sum(a + b for a, b in nfe_o)}, "
          f"reference {sum(a + b for a, b in nfe_r)}")
    print()
    print("| weights | adjoint | NFE fwd | NFE bwd | bwd NFE vs torchdiffeq default | grad rel. error vs f64 ref | wall [s] |")
    print("|---|---|---|---|---|---|---|")
    for i in range(0, len(grad_rows), 4):
        group = grad_rows[i:i + 4]
        base = group[2][3]
        for label, name, nf, nb, err, wall, _ in group:
            print(f"| {label} | {name} | {nf} | {nb} | {nb / base - 1:+.0%} | {err:.1e} | {wall:.2f} |")
        gs, gt = group[0][6], group[2][6]
        print(f"| {group[0][0]} | ours seminorm vs torchdiffeq default: grad rel. diff | | | | "
              f"{float((gs - gt).norm() / gt.norm()):.1e} | |")


if __name__ == "__main__":
    main()
