"""Neural ODE on time series: dy/dt = f_θ(t, y), f an MLP (Chen et al. 2018, ``ode_demo.py``),
optionally augmented (ANODE, Dupont et al. 2019: the state is [y, a] with a(t0) = 0, so
trajectories that would cross in y-space need not).

Every series is integrated from its first observation on its own time grid: ``odeint`` with
``step_control="per_sample"`` and ``t`` of shape (B, T) (each row its own steps and output times,
so a row's answer does not depend on the rows beside it). Gradients are by backpropagation through
the solver (the engine's adjoint does not take per-row grids).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from node_engine.models.series import SeriesModel, masked_mse, start_grid, take
from node_engine.odeint import odeint
from node_engine.specs import NODESection, SolverSection

_ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus}


class MLPField(nn.Module):
    """f_θ(t, z): an MLP of [z, t]. ``z`` (B, Z); ``t`` a scalar tensor or (B,) (per-sample)."""

    def __init__(self, state_dim: int, hidden_dims: tuple[int, ...], nonlinearity: str):
        super().__init__()
        widths = [state_dim + 1, *hidden_dims]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), _ACTIVATIONS[nonlinearity]()]
        layers.append(nn.Linear(widths[-1], state_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        tt = t.reshape(-1, 1).to(z.dtype).expand(z.shape[0], 1)
        return self.net(torch.cat([z, tt], dim=1))


class NeuralODE(SeriesModel):
    """y(t) = y(t0) + ∫ f_θ dt per series. Attributes: ``dim`` D, ``augment_dim`` A, ``stats``, ``solver``."""

    name = "node"

    needs_observed_start = True  #: every series starts from its first observation, which must be fully observed

    def __init__(self, dim: int, field: MLPField, augment_dim: int, solver: SolverSection):
        super().__init__(solver)
        self.dim, self.augment_dim, self.field = dim, augment_dim, field

    @classmethod
    def from_spec(cls, model_spec: Mapping[str, Any], solver_spec: Mapping[str, Any] | None, dim: int) -> "NeuralODE":
        """Raises ValueError for bad options (``node_engine.specs.NODESection``) or a fixed-grid method."""
        spec = NODESection.from_spec(model_spec, strict=False)
        field = MLPField(dim + spec.augment_dim, spec.hidden_dims, spec.nonlinearity)
        return cls(dim, field, spec.augment_dim, SolverSection.from_spec(solver_spec, strict=False))

    def forward(self, t: Tensor, y0: Tensor) -> Tensor:
        """Trajectories from ``y0`` (B, D) at ``t`` (B, T), each row strictly increasing, t[:, 0] the
        start time of its row. Returns (B, T, D), out[:, 0] = y0. Raises SolverError subclasses
        (or, with ``solver.raise_on_failure`` False and no grad, NaN rows; see ``stats.status``)."""
        z0 = y0
        if self.augment_dim:
            z0 = torch.cat([y0, y0.new_zeros(y0.shape[0], self.augment_dim)], dim=1)
        options = {**self.solver.solver_options(), "step_control": "per_sample"}
        out = odeint(self.field, z0, t.to(y0.dtype), rtol=self.solver.rtol, atol=self.solver.atol,
                     method=self.solver.method, options=options, stats=self.stats)
        return out.permute(1, 0, 2)[..., :self.dim]

    def predict(self, t: Tensor, y: Tensor, mask: Tensor, lengths: Tensor, t_out: Tensor) -> Tensor:
        """Trajectories at ``t_out`` (B, M) >= t[:, 0] from each row's first observation y[:, 0] (fully
        observed; the later observations are not read): (B, M, D) standardized
        (``node_engine.models.series`` layout)."""
        grid, index = start_grid(t[:, 0], t_out)
        return take(self(grid, y[:, 0]), index)

    def loss(self, t: Tensor, y: Tensor, mask: Tensor, lengths: Tensor,
             generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """MSE over the observed entries after the start (integrated from y[:, 0] on the row's own times)."""
        pred = self(t, y[:, 0])
        return masked_mse(pred[:, 1:], y[:, 1:], mask[:, 1:]), {}
