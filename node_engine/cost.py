"""What a job spec will cost, estimated before it runs, and the tolerances its dtype can honour.

The service refuses a submission whose estimate exceeds the deployment's budget
(``ODEFORGE_MAX_JOB_COST``) or whose ``rtol`` is below what floating point can deliver; the worker
still enforces time, memory and NFE limits while the job runs (the estimate is a guess).

**Cost units.** ``cost = P · S · E``: P the model's parameter count (built on PyTorch's ``meta``
device: exact, no memory), S the state size of one sample (D for points and series, C·H·W for
images), and E the number of per-sample field evaluations of the whole job:

    E = iterations · batch · 3 · nfe(rtol)            (training: forward + adjoint backward ≈ 3 solves)
      + n_evals · n_test · nfe(eval_rtol)             (evaluations every ``eval_every`` steps + the last)

``nfe`` is a guess of evaluations per solve: an adaptive method of order p takes about
``rtol^(-1/p)`` steps (the local error of a step of size h is ~h^(p+1); on a unit interval with
unit derivatives that gives h ~ rtol^(1/(p+1)), rounded here toward more steps), each costing its
tableau's stages (one fewer with FSAL), capped by ``max_num_steps``; a fixed-grid method takes
``end_time / step_size`` steps. The stiff ``kvaerno5`` (order 5) costs per step its explicit stage,
one Newton solve of ``STIFF_NEWTON_ITERS`` field calls for each of its six implicit stages and a
Jacobian: one call plus one vector–Jacobian product per Jacobian column, i.e. S columns per sample
when every sample is stepped on its own (served answers; per-sample training solves) and
batch · S when a training batch is solved jointly (its Jacobian spans the whole batch). Models
without an ODE count one evaluation. It is a size measure
(parameters × samples × state × evaluations), proportional to multiply-adds for MLP fields, not
seconds: the default budget is set far above every example of the project.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from node_engine.solvers import METHODS, STIFF

__all__ = ["CostEstimate", "estimate_cost", "min_rtol", "RTOL_EPS_FACTOR", "input_info", "tolerance_errors"]

#: an rtol below ~this many machine epsilons of the dtype cannot be honoured: the error estimate of
#: a step is then round-off, so the controller shrinks steps until they underflow or the step budget
#: runs out. 50 (not 100) keeps the long-standing float32 default rtol 1e-5 (FFJORD's) admissible.
RTOL_EPS_FACTOR = 50
#: dtype of training solves (the trainer's; a spec has no dtype field)
JOB_DTYPE = torch.float32
#: dtype of the solves ``eval_rtol`` is for: served answers (``node_engine.inference.SERVE_DTYPE``)
EVAL_DTYPE = torch.float64
#: image side of the image data sets (single channel); others are 28×28 MNIST
_IMAGE_SIDE = {"digits": 8}
#: fixed-grid step of rknet when the spec gives none (classifiers.RKNET_DEFAULT_STEP)
_DEFAULT_FIXED_STEP = 0.1


def min_rtol(dtype: torch.dtype = JOB_DTYPE) -> float:
    """The smallest rtol a solve in ``dtype`` can honour: ``RTOL_EPS_FACTOR`` · machine epsilon
    (float32: 5.96e-6; float64: 1.11e-14)."""
    return RTOL_EPS_FACTOR * torch.finfo(dtype).eps


def tolerance_errors(solver: Mapping[str, Any]) -> list[dict[str, str]]:
    """``{"field", "reason"}`` for each tolerance of a spec's ``solver`` section below what its
    dtype can honour: ``solver.rtol`` (training, float32) and ``solver.eval_rtol`` (served answers,
    float64). Empty when both can be honoured."""
    out = []
    for name, dtype in (("rtol", JOB_DTYPE), ("eval_rtol", EVAL_DTYPE)):
        value = solver.get(name)
        floor = min_rtol(dtype)
        if value is not None and float(value) < floor:
            out.append({"field": f"solver.{name}", "reason": (
                f"{float(value):g} is below {floor:.3g} = {RTOL_EPS_FACTOR} x the machine epsilon of "
                f"{str(dtype).removeprefix('torch.')}, the precision its solves run in; no step can be "
                f"accepted at that tolerance")})
    return out


@dataclass(frozen=True)
class CostEstimate:
    """Parts of the estimate (see the module docstring); ``total`` is what a budget is compared with."""

    parameters: int
    state_size: int
    train_evaluations: float  # per-sample field evaluations of training
    eval_evaluations: float  # per-sample field evaluations of the evaluations

    @property
    def total(self) -> float:
        return float(self.parameters) * self.state_size * (self.train_evaluations + self.eval_evaluations)

    def to_json(self) -> dict[str, Any]:
        return {"parameters": self.parameters, "state_size": self.state_size,
                "train_evaluations": self.train_evaluations, "eval_evaluations": self.eval_evaluations,
                "total": self.total}


def input_info(dataset: Mapping[str, Any], upload_shape: list[int] | tuple[int, ...] | None = None) -> dict[str, Any]:
    """The data info a model is built from (``dim`` or ``input_shape``), known without loading the
    data: uploads give their stored shape ((N, D) arrays, (N, T, D) series), toys and energies are
    2-D, the time-series generators 2-D, images single-channel squares."""
    from node_engine.datasets import DATASETS

    name = dataset["name"]
    if upload_shape is not None:
        return {"dim": int(upload_shape[-1]), "n": int(upload_shape[0])}
    if DATASETS[name].kind == "classifier":
        side = _IMAGE_SIDE.get(name, 28)
        return {"input_shape": (1, side, side)}
    return {"dim": 2}


#: guessed Newton iterations per implicit stage of kvaerno5 (its Newton test stops at 1-3 on smooth steps)
STIFF_NEWTON_ITERS = 3


def _nfe_per_solve(solver: Mapping[str, Any], rtol: float, span: float, jacobian_columns: int = 1) -> float:
    """Guessed field evaluations of one solve over a time span ``span`` (module docstring);
    ``jacobian_columns``: vector–Jacobian products per Jacobian of a stiff method."""
    if solver["method"] in STIFF:
        tab = STIFF[solver["method"]]
        per_step = 1 + (tab.stages - 1) * STIFF_NEWTON_ITERS + 1 + jacobian_columns
    else:
        tab = METHODS[solver["method"]]
        per_step = tab.stages - (1 if tab.fsal else 0)
    if not tab.adaptive:
        step = solver.get("step_size") or _DEFAULT_FIXED_STEP
        return math.ceil(span / step) * per_step
    steps = min(float(solver["max_num_steps"]), max(1.0, span * rtol ** (-1.0 / tab.order)))
    return 2 + steps * per_step  # + the initial step-size estimate


def estimate_cost(spec: Mapping[str, Any], info: Mapping[str, Any]) -> CostEstimate:
    """The cost of a normalized job spec (:func:`node_engine.specs.normalize_spec`) on data
    described by ``info`` (:func:`input_info`).

    Raises:
        ValueError: the model cannot be built from the spec (as the trainer would raise).
    """
    from node_engine.models import MODEL_TYPES, build_model

    model, solver, training, dataset = spec["model"], spec["solver"], spec["training"], spec["dataset"]
    entry = MODEL_TYPES[model["type"]]
    kwargs = ({"input_shape": tuple(info["input_shape"])} if entry.input == "images" else {"dim": int(info["dim"])})
    with torch.device("meta"):  # parameter shapes only: no memory, no initialization cost
        net = build_model(model, solver, **kwargs)
    parameters = sum(p.numel() for p in net.parameters())
    state = int(np.prod(info["input_shape"])) if "input_shape" in info else int(info["dim"])
    n = min(int(dataset["n_samples"]), int(info.get("n", dataset["n_samples"])))
    n_test = max(1, math.ceil(n * float(dataset["test_fraction"])))
    batch = int(training["batch_size"])
    if training.get("epochs"):
        iterations = int(training["epochs"]) * math.ceil(max(1, n - n_test) / batch)
    else:
        iterations = int(training["iterations"])
    span = float(model.get("end_time", 1.0) or 1.0) * int(model.get("num_blocks", 1) or 1)
    if entry.solves_ode:
        eval_rtol = float(solver.get("eval_rtol") or solver["rtol"])
        # a stiff method's Jacobian: per sample in served answers and per-sample training solves (time
        # series without the adjoint), over the whole batch in joint training solves
        joint = not (entry.per_row_grids and not solver.get("adjoint"))
        nfe_train = _nfe_per_solve(solver, float(solver["rtol"]), span, state * (batch if joint else 1))
        nfe_eval = _nfe_per_solve(solver, eval_rtol, span, state)
    else:
        nfe_train = nfe_eval = 1.0
    n_evals = math.ceil(iterations / int(training["eval_every"])) + 1
    return CostEstimate(parameters=int(parameters), state_size=state,
                        train_evaluations=float(iterations) * batch * 3 * nfe_train,
                        eval_evaluations=float(n_evals) * n_test * nfe_eval)
