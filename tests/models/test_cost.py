"""The submission-time cost estimate and tolerance floor (node_engine.cost): parameter counts against
hand counts of the architectures, the evaluation count against the documented formula, and the
floor against the dtypes' machine epsilons (numpy's, not torch's)."""

import numpy as np
import pytest

from node_engine.cost import RTOL_EPS_FACTOR, estimate_cost, input_info, min_rtol, tolerance_errors
from node_engine.specs import normalize_spec


def cost(spec, upload_shape=None):
    spec = normalize_spec(spec)
    return estimate_cost(spec, input_info(spec["dataset"], upload_shape))


def test_mlp_classifier_counts_parameters_and_evaluations_by_hand():
    """digits: 8x8 inputs; mlp(h): 64·h + h + h·10 + 10 parameters (two linear layers); no ODE: one
    evaluation per sample; 3 per training sample (forward + backward)."""
    h = 50
    c = cost({"model": {"type": "mlp", "hidden": h}, "dataset": {"name": "digits", "n_samples": 1000},
              "training": {"iterations": 20, "batch_size": 32, "eval_every": 10}})
    assert c.parameters == 64 * h + h + h * 10 + 10
    assert c.state_size == 64
    assert c.train_evaluations == 20 * 32 * 3
    assert c.eval_evaluations == (2 + 1) * 200  # evaluations at steps 10, 20 (+ one), 200 test images
    assert c.total == c.parameters * 64 * (20 * 32 * 3 + 3 * 200)


def test_fixed_grid_ode_counts_steps_times_stages():
    """rk4 with step 0.25 over [0, 1]: 4 steps x 4 stages per solve."""
    c = cost({"model": {"type": "cnf", "hidden_dims": [8]}, "dataset": {"name": "moons", "n_samples": 100},
              "solver": {"method": "rk4", "step_size": 0.25},
              "training": {"iterations": 1, "batch_size": 10, "eval_every": 1}})
    assert c.train_evaluations == 1 * 10 * 3 * 16 and c.state_size == 2


def test_cost_grows_with_tolerance_batch_and_iterations_and_upload_dims():
    base = {"model": {"type": "cnf"}, "dataset": {"name": "moons"}}
    c0 = cost(base)
    assert cost({**base, "solver": {"rtol": 1e-8}}).total > c0.total
    assert cost({**base, "solver": {"eval_rtol": 1e-12}}).eval_evaluations > c0.eval_evaluations
    assert cost({**base, "training": {"iterations": 2000}}).train_evaluations == 2 * c0.train_evaluations
    up = cost({"model": {"type": "cnf"}, "dataset": {"name": "upload", "id": "x"}}, upload_shape=[1000, 6])
    assert up.state_size == 6 and up.parameters > c0.parameters
    # the step budget caps the guess: max_num_steps=1 means at most one step per solve
    capped = cost({**base, "solver": {"rtol": 1e-9, "max_num_steps": 1}})
    assert capped.train_evaluations == 1000 * 512 * 3 * (2 + 6)  # iterations x batch x 3 x (estimate + 1 step)


def test_the_attack_spec_is_far_above_the_default_budget_and_the_examples_far_below():
    from jobs.settings import Settings

    budget = Settings().max_job_cost
    worst = {"model": {"type": "cnf", "hidden_dims": [1024] * 8, "num_blocks": 4},
             "dataset": {"name": "moons", "n_samples": 1_000_000},
             "training": {"iterations": 1_000_000, "batch_size": 65536}}
    assert cost(worst).total > 1000 * budget
    examples = [
        {"model": {"type": "cnf"}, "dataset": {"name": "moons"}},
        {"model": {"type": "cnf", "hidden_dims": [32, 32]}, "dataset": {"name": "moons"}, "training": {"iterations": 300}},
        {"model": {"type": "mlp"}, "dataset": {"name": "digits"}, "training": {"epochs": 5}},
        {"model": {"type": "odenet"}, "dataset": {"name": "mnist"}, "training": {"epochs": 10}},
        {"model": {"type": "node", "hidden_dims": [64, 64]}, "dataset": {"name": "lotka_volterra", "n_samples": 200},
         "solver": {"rtol": 1e-3, "atol": 1e-4, "adjoint": False}, "training": {"iterations": 300, "lr": 0.01}},
    ]
    assert max(cost(s).total for s in examples) < budget / 100


def test_rtol_floor_is_the_dtypes_epsilon_times_the_factor():
    assert min_rtol() == pytest.approx(RTOL_EPS_FACTOR * float(np.finfo(np.float32).eps))
    f32 = RTOL_EPS_FACTOR * float(np.finfo(np.float32).eps)
    f64 = RTOL_EPS_FACTOR * float(np.finfo(np.float64).eps)
    assert 1e-6 < f32 < 1e-5  # the default rtol 1e-5 is admissible
    assert tolerance_errors({"rtol": 1e-5, "eval_rtol": 1e-13}) == []
    errs = tolerance_errors({"rtol": f32 / 2, "eval_rtol": f64 / 2})
    assert [e["field"] for e in errs] == ["solver.rtol", "solver.eval_rtol"]
    assert "float32" in errs[0]["reason"] and "float64" in errs[1]["reason"]
    assert f"below {f32:.3g}" in errs[0]["reason"] and f"below {f64:.3g}" in errs[1]["reason"]
