"""Solver statistics: the one interface through which every solve reports its cost.

A :class:`SolverStats` is passed to ``odeint(..., stats=s)`` / ``odeint_adjoint(..., stats=s)``.
Counters *accumulate* over every solve that receives the object (a model with several ODE blocks,
a forward and its adjoint backward), so a trainer makes one per iteration, or calls ``reset()``.
The adjoint's backward pass writes to the same object from inside autograd, which works even where
autograd runs ``backward`` on another thread (CUDA), unlike a context variable would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class SolverStats:
    """Counters of ODE solves (Chen et al. 2018 report NFE as a model's cost, Fig. 3).

    Attributes:
        nfe_forward: vector-field evaluations in forward solves (int).
        nfe_backward: vector-field evaluations (of the augmented adjoint system, or of the step
            rebuilds in checkpoint mode) during backward passes (int).
        steps_accepted: accepted steps over all forward and backward solves (int).
        steps_rejected: rejected trial steps over all solves (int).
        last_step_size: absolute size of the last accepted step of the last solve (float, in units of t).
        forward_steps_accepted: accepted steps of forward solves only (int; per-sample solves: per
            sample, like steps_accepted).
        forward_time: length |t[-1] - t[0]| of the interval each forward solve covered, summed
            (float, units of t; per-sample solves: summed over rows). ``forward_time /
            forward_steps_accepted`` is the mean accepted forward step (:meth:`mean_forward_step`).
        sample_evaluations: batch rows evaluated by the field in ``step_control="per_sample"``
            solves (the vector-field work; a joint solve's equivalent is nfe × batch). Per-sample
            solves count steps_accepted/steps_rejected per sample.
        status: per-row outcome of the *last* solve given this object (not accumulated): a CPU
            int64 tensor of :class:`node_engine.errors.SolveStatus` values, shape (B,) for a
            per-sample solve, (1,) for a joint solve (the whole state is one row); None before any
            solve. Set when the solve returns or raises (the adjoint's backward does not touch it).
        compile_seconds: wall time [s] of solver calls during which ``options["compile"]`` compiled
            (or recompiled) a trial step; steady-state cost excludes it (float).
        compiled_steps: trial steps made by a compiled step function (int; forward and backward).
        compile_fallback: why ``options["compile"]`` ran eagerly in the last solve that could not
            compile (a graph break, an unsupported method or field), or None.
    """

    nfe_forward: int = 0
    nfe_backward: int = 0
    steps_accepted: int = 0
    steps_rejected: int = 0
    last_step_size: float = float("nan")
    sample_evaluations: int = 0
    status: torch.Tensor | None = None
    forward_steps_accepted: int = 0
    forward_time: float = 0.0
    compile_seconds: float = 0.0
    compiled_steps: int = 0
    compile_fallback: str | None = None

    def reset(self) -> None:
        """Set every counter back to zero."""
        self.nfe_forward = self.nfe_backward = self.steps_accepted = self.steps_rejected = 0
        self.last_step_size = float("nan")
        self.sample_evaluations = self.forward_steps_accepted = 0
        self.forward_time = 0.0
        self.status = None
        self.compile_seconds = 0.0
        self.compiled_steps = 0
        self.compile_fallback = None

    def mean_forward_step(self) -> float:
        """Mean accepted step size of the forward solves so far, in units of t (``forward_time /
        forward_steps_accepted``); NaN before any accepted forward step. For a fixed-grid method it
        is the grid spacing; ``scipy_solver`` reports evaluations as steps, so there it is a lower bound."""
        return self.forward_time / self.forward_steps_accepted if self.forward_steps_accepted else float("nan")

    def as_dict(self) -> dict:
        """The counters as a JSON-ready dict (the keys above; ``status`` as a list of ints or None)."""
        d = asdict(self)
        d["status"] = None if self.status is None else [int(x) for x in self.status.tolist()]
        return d
