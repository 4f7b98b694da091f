"""What the time-series models (``node``, ``latent_ode``, ``rnn``) share: the batch layout they read and
the output grids of per-sample solves.

Every time-series model takes observations as padded tensors, one row per series (standardized
units; times in the user's units):

* ``t`` (B, L): row b's observation times, strictly increasing over the whole row (padding past
  ``lengths[b]`` continues strictly upwards, ``node_engine.datasets.timeseries.strict_grid``);
* ``y`` (B, L, D) values (0 where missing), ``mask`` (B, L, D) float, 1 = observed;
* ``lengths`` (B,) int64: observations of row b (>= 1); positions past it are never read.

and answers at times ``t_out`` (B, M), each row strictly increasing and not before the row's first
observation ``t[b, 0]``, with ``predict(t, y, mask, lengths, t_out) -> (B, M, D)``. Training calls
``loss(t, y, mask, lengths, generator) -> (loss, record metrics)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from node_engine.solvers import FIXED
from node_engine.specs import SolverSection
from node_engine.stats import SolverStats

class SeriesModel(nn.Module):
    """Base of the time-series models: holds ``solver`` (a :class:`SolverSection`) and ``stats`` (NFE of
    its solves), and the model API the trainer calls (``set_tolerances``, ``use_solver``,
    ``regularization``: none). ``name`` / ``adaptive_only``: a model that integrates each series on its
    own times refuses a fixed-grid method (ValueError naming ``solver.method``)."""

    name = ""
    adaptive_only = True

    def __init__(self, solver: SolverSection | None = None):
        super().__init__()
        solver = solver or SolverSection()
        if self.adaptive_only and solver.method in FIXED:
            raise ValueError(f"solver.method: model {self.name!r} integrates each series on its own time grid and "
                             f"needs an adaptive method, got {solver.method!r}")
        self.solver = solver
        self.stats = SolverStats()

    def set_tolerances(self, rtol: float, atol: float) -> None:
        self.solver = self.solver.with_tolerances(rtol, atol)

    def use_solver(self, solver: SolverSection) -> None:
        self.solver = solver

    def regularization(self) -> dict[str, Tensor]:
        return {}


#: extra output time past a row's last wanted time, as a share of the row's span (>= 1 time unit)
PAST_END = 1e-6


def start_grid(t0: Tensor, t_out: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row output grids of a solve that starts at ``t0`` (B,) and answers at ``t_out`` (B, M).

    Row b's grid is [t0_b, t_out_b] when t_out_b[0] > t0_b; when its start itself is wanted
    (t_out_b[0] == t0_b) the duplicate is dropped and one time just past t_out_b[-1] is appended, so
    every row keeps M + 1 strictly increasing entries and depends on no other row.

    Returns:
        grid (B, M + 1) and ``index`` (B, M) int64: the outputs of ``t_out`` are ``out[b, index[b]]``
        of a solve's (B, M + 1, ...) output (use :func:`take`).
    """
    t0 = t0.to(t_out.dtype)
    starts_wanted = t_out[:, 0] <= t0  # callers guarantee t_out >= t0, so this means equality
    tail = t_out[:, -1] + PAST_END * torch.clamp(t_out[:, -1] - t0, min=1.0)
    shifted = torch.cat([t_out[:, 1:], tail[:, None]], dim=1)
    grid = torch.cat([t0[:, None], torch.where(starts_wanted[:, None], shifted, t_out)], dim=1)
    steps = torch.arange(t_out.shape[1], device=t_out.device)[None, :]
    index = steps + (~starts_wanted).long()[:, None]
    return grid, index


def take(out: Tensor, index: Tensor) -> Tensor:
    """``out`` (B, M + 1, ...) at the positions ``index`` (B, M) of :func:`start_grid`: (B, M, ...)."""
    shape = (*index.shape, *out.shape[2:])
    return out.gather(1, index.reshape(*index.shape, *([1] * (out.dim() - 2))).expand(shape))


def context_lengths(lengths: Tensor) -> Tensor:
    """The fitted share of each series (``timeseries.context_lengths``, as a tensor): (B,) int64."""
    from node_engine.datasets.timeseries import context_lengths as numpy_context

    return torch.as_tensor(numpy_context(lengths.cpu().numpy()), device=lengths.device)


def masked_mse(pred: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Mean of (pred − y)² over the observed entries (``mask`` 1): a 0-dim tensor (0 when none)."""
    return (((pred - y) ** 2) * mask).sum() / mask.sum().clamp_min(1.0)
