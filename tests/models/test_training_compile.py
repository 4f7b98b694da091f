"""Compiled trial steps in training (issue 17): who may compile (spec, deployment, the trainer's
"auto" gate) and a compiled training run equal to the eager one to rounding."""

from __future__ import annotations

import math

import pytest
import torch

from node_engine.solve_limits import solve_limits
from node_engine.specs import SolverSection
from node_engine.training import build_trainer


def test_served_solves_never_compile():
    """Outside a block that allows it (the API's inference), no spec setting adds the option."""
    for choice in ("auto", "on", "off"):
        assert "compile" not in SolverSection(compile=choice).solver_options()


def test_spec_and_deployment_decide():
    with solve_limits(compile=True):
        assert SolverSection(compile="auto").solver_options()["compile"] == "auto"
        assert SolverSection(compile="on").solver_options()["compile"] is True
        assert "compile" not in SolverSection(compile="off").solver_options()
        # only explicit adaptive RK has a compiled step
        assert "compile" not in SolverSection(method="rk4", step_size=0.1).solver_options()
        assert "compile" not in SolverSection(method="kvaerno5", adjoint=False).solver_options()
        with solve_limits(compile_auto=False):  # the trainer holding "auto" back; "on" still compiles
            assert "compile" not in SolverSection(compile="auto").solver_options()
            assert SolverSection(compile="on").solver_options()["compile"] is True
    with solve_limits(compile=False):  # the deployment says no (ODEFORGE_SOLVER_COMPILE=false)
        assert "compile" not in SolverSection(compile="on").solver_options()


def test_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="compile"):
        SolverSection(compile="yes")


def _spec(compile_choice: str, iterations: int = 3) -> dict:
    return {"model": {"type": "latent_ode"},
            "dataset": {"name": "spirals", "n_samples": 12, "n_points": 10, "seed": 0},
            "solver": {"method": "dopri5", "rtol": 1e-4, "atol": 1e-4, "compile": compile_choice},
            "training": {"iterations": iterations, "batch_size": 8, "eval_every": 1000,
                         "checkpoint_every": 1000, "log_every": 1, "seed": 0}}


def test_auto_gate_waits_for_a_long_enough_job():
    """"auto" compiles only once the job's remaining eager time is worth a compile."""
    from node_engine.training import trainer as trainer_module
    tr = build_trainer(_spec("auto", iterations=10))
    tr.step, tr.elapsed_seconds = 0, 0.0
    assert not tr._auto_compile_pays()  # no step timed yet
    tr.step, tr.elapsed_seconds = trainer_module.AUTO_COMPILE_WARMUP_STEPS, 0.01
    assert not tr._auto_compile_pays()  # 2 ms a step x 5 left: far below the threshold
    tr.elapsed_seconds = 500.0  # 100 s a step x 5 left = 500 s >= the threshold
    assert tr._auto_compile_pays()
    tr.elapsed_seconds = 500.01
    assert tr._auto_compile_pays()  # it stays on


@pytest.mark.slow
def test_compiled_training_equals_eager():
    """A latent-ODE training step with the adjoint (its latent solve compiled; the encoder's solves
    record autograd and stay eager) gives the eager run's loss, NFE and updated parameters to
    rounding, and its row reports the compile time (one compile: ~20 s on a CPU)."""
    runs = {}
    for choice in ("off", "on"):
        tr = build_trainer(_spec(choice))
        rows = []
        with solve_limits(compile=True):
            rows.append(tr._train_step())
        runs[choice] = (rows, [p.detach().clone() for p in tr.model.parameters()])
    eager, compiled = runs["off"][0], runs["on"][0]
    assert all("compile_seconds" not in r for r in eager)
    assert compiled[0]["compile_seconds"] > 0  # the first step compiled
    assert tr.model.stats.compiled_steps > 0
    for a, b in zip(eager, compiled):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["loss"], b["loss"])
        assert (a["nfe_forward"], a["nfe_backward"]) == (b["nfe_forward"], b["nfe_backward"])
    for p, q in zip(runs["off"][1], runs["on"][1]):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
