"""ODE-Net, ResNet, RK-Net, MLP (Chen et al. 2018, Table 1): sizes, shapes, adjoint gradients, fixed-step RK."""

from __future__ import annotations

import pytest
import torch

from node_engine.models import build_model

PAPER_PARAMETERS = {"mlp": 0.24e6, "resnet": 0.60e6, "rknet": 0.22e6, "odenet": 0.22e6}  # Table 1


@pytest.mark.parametrize("kind", sorted(PAPER_PARAMETERS))
def test_parameter_counts_within_5_percent_of_paper(kind):
    model = build_model({"type": kind}, {}, input_shape=(1, 28, 28))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PAPER_PARAMETERS[kind]) <= 0.05 * PAPER_PARAMETERS[kind], count


@pytest.mark.parametrize("kind", sorted(PAPER_PARAMETERS))
@pytest.mark.parametrize("size", [8, 11, 28])
def test_any_square_single_channel_input(kind, size):
    model = build_model({"type": kind, "channels": 8, "hidden": 20, "num_blocks": 2},
                        {"method": "rk4", "step_size": 0.5, "adjoint": False}, input_shape=(size, size))
    assert model.input_shape == (1, size, size)
    out = model(torch.randn(3, 1, size, size))
    assert out.shape == (3, 10) and torch.all(torch.isfinite(out))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="square"):
        build_model({"type": "odenet"}, {}, input_shape=(1, 8, 9))
    with pytest.raises(ValueError, match="unknown model type"):
        build_model({"type": "densenet"}, {}, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        build_model({"type": "mlp"}, {})
    with pytest.raises(ValueError, match="model.hidden"):
        build_model({"type": "mlp", "hidden": 0}, {}, input_shape=(1, 8, 8))


@pytest.mark.parametrize("channels, groups", [(2, 1), (3, 1), (5, 1), (16, 8), (32, 16), (48, 24), (64, 32), (96, 32)])
def test_group_norm_groups_hold_at_least_two_channels(channels, groups):
    # one channel per group on the 2x2 maps of 8x8 digits normalizes 4 numbers: odenet C=16 stayed at chance
    from node_engine.models.classifiers import group_norm

    norm = group_norm(channels)
    assert (norm.num_groups, norm.num_channels) == (groups, channels)
    model = build_model({"type": "odenet", "channels": channels}, {}, input_shape=(1, 8, 8))
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def _odenet(adjoint: bool, tol: float, size: int = 16):
    torch.manual_seed(0)  # same initial weights for both
    solver = {"method": "dopri5", "rtol": tol, "atol": tol, "adjoint": adjoint}
    return build_model({"type": "odenet", "channels": 8}, solver, input_shape=(1, size, size)).double()


def _grads(model, x, y):
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_adjoint_gradients_agree_with_backprop_through_solver():
    """Chen et al. 2018, eq. 3-5: the adjoint backsolve gives dL/dθ of the continuous ODE; backprop through the
    adaptive solve differentiates its discretization. Both converge to the same gradient as tol -> 0; the ReLU
    kinks of the field limit the agreement to a few 1e-3 at tol = 1e-7 (measured), so the bound is 1e-2 —
    a wrong sign, a missing term or a wrong time direction gives O(1) differences."""
    a, b = _odenet(True, 1e-7), _odenet(False, 1e-7)
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 7, 9])
    ga, gb = _grads(a, x, y), _grads(b, x, y)
    assert a.stats.nfe_backward > 0 and b.stats.nfe_backward == 0
    flat_a = torch.cat([g.flatten() for g in ga.values()])
    flat_b = torch.cat([g.flatten() for g in gb.values()])
    assert (flat_a - flat_b).norm() <= 1e-2 * flat_b.norm()
    # the ODE block's own parameters (gradients only through the adjoint's a_θ integral)
    ode_a = torch.cat([g.flatten() for n, g in ga.items() if ".func." in n])
    ode_b = torch.cat([g.flatten() for n, g in gb.items() if ".func." in n])
    assert ode_b.norm() > 0.1 * flat_b.norm() / len(ga)
    assert (ode_a - ode_b).norm() <= 1e-2 * ode_b.norm()
    # input gradient a(0) flows into the downsampling layers
    assert (ga["body.0.weight"] - gb["body.0.weight"]).norm() <= 1e-2 * gb["body.0.weight"].norm()


def test_rknet_is_fixed_step_runge_kutta_without_adjoint():
    torch.manual_seed(0)
    model = build_model({"type": "rknet", "channels": 8}, {"method": "dopri5", "step_size": 0.25, "adjoint": True},
                        input_shape=(1, 8, 8))
    _grads(model, torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    # classic RK4: 4 stages per step, 1 / 0.25 = 4 steps; backprop through the solver, no adjoint solve
    assert model.stats.nfe_forward == 16 and model.stats.nfe_backward == 0


def test_rknet_converges_to_the_odenet_solution():
    torch.manual_seed(0)
    ode = build_model({"type": "odenet", "channels": 8}, {"rtol": 1e-10, "atol": 1e-10}, input_shape=(1, 8, 8)).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        exact = ode(x)
        errors = []
        for step in (0.2, 0.05, 0.0125):
            rk = build_model({"type": "rknet", "channels": 8}, {"step_size": step}, input_shape=(1, 8, 8)).double()
            rk.load_state_dict(ode.state_dict())
            errors.append((rk(x) - exact).abs().max().item())
    # same ODE: the fixed-step error shrinks with the step (ReLU kinks cap RK4 below its 4th order)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4 * exact.abs().max().item() + 1e-4


def test_eval_tolerances_change_nfe():
    torch.manual_seed(0)
    model = build_model({"type": "odenet", "channels": 8}, {"rtol": 1e-2, "atol": 1e-2}, input_shape=(1, 8, 8))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        model(x)
        loose = model.stats.nfe_forward
        model.stats.reset()
        model.set_tolerances(1e-7, 1e-7)
        model(x)
    assert model.stats.nfe_forward > loose
