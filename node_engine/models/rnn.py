"""GRU baseline on irregular time series with the time gap as an input (Chen et al. 2018 §5.1, the
"RNN" of Table 2; Rubanova et al. 2019 "RNN-Δt"). No ODE.

The recurrence reads observation i as x_i = [y_i ⊙ m_i, m_i, t_i − t_{i−1}] (m the mask, the first
gap 0): h_i = GRU(x_i, h_{i−1}), h_{−1} = 0. A prediction at a time τ after t_i comes from the last
state before it and the gap: ŷ(τ) = g([h_i, τ − t_i]) (g an MLP), so one state predicts any
horizon. Training: one-step-ahead predictions ŷ(t_{i+1}) = g([h_i, t_{i+1} − t_i]), MSE over the
observed entries (standardized units).

Answers at wanted times τ (``predict``):
* τ at or before a series' last observation: g([h_i, τ − t_i]) with t_i the last observation
  strictly before τ (teacher forcing: the real observations drive the state); τ = t_0, with nothing
  before it, answers the first observation itself (0, the data's mean, where missing);
* τ after the last observation: autoregressively, in time order: ŷ(τ_1) = g([h_last, τ_1 − t_last]),
  then the prediction is fed back as a fully observed input, h ← GRU([ŷ(τ_1), 1, τ_1 − t_last], h),
  ŷ(τ_2) = g([h, τ_2 − τ_1]), and so on.
Each row is computed from its own inputs only (no solver; deterministic).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from node_engine.models.series import SeriesModel, masked_mse
from node_engine.specs import RNNSection, SolverSection

__all__ = ["GRUBaseline"]


class GRUBaseline(SeriesModel):
    """GRU with Δt input (module doc). Attributes: ``dim`` D, ``hidden`` H, ``gru`` (input 2D + 1),
    ``decoder`` ([h, Δt] -> D), ``stats`` (stays 0: no ODE), ``solver`` (unused; kept for the common API)."""

    name = "rnn"
    adaptive_only = False  # no ODE: any solver section is accepted and unused
    needs_observed_start = False

    def __init__(self, dim: int, hidden: int, solver: SolverSection | None = None):
        super().__init__(solver)
        self.dim, self.hidden = dim, hidden
        self.gru = nn.GRUCell(2 * dim + 1, hidden)
        self.decoder = nn.Sequential(nn.Linear(hidden + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    @classmethod
    def from_spec(cls, model_spec: Mapping[str, Any], solver_spec: Mapping[str, Any] | None,
                  dim: int) -> "GRUBaseline":
        """Raises ValueError for bad options (``node_engine.specs.RNNSection``)."""
        spec = RNNSection.from_spec(model_spec, strict=False)
        return cls(dim, spec.hidden, SolverSection.from_spec(solver_spec, strict=False))

    def states(self, t: Tensor, y: Tensor, mask: Tensor, lengths: Tensor) -> Tensor:
        """h_i after each observation: (B, L, H); rows past ``lengths[b]`` repeat the last state."""
        batch, width = t.shape
        h = y.new_zeros(batch, self.hidden)
        out = []
        for i in range(width):
            gap = (t[:, i] - t[:, i - 1]) if i else torch.zeros_like(t[:, 0])
            x = torch.cat([y[:, i] * mask[:, i], mask[:, i], gap.to(y.dtype)[:, None]], dim=1)
            h = torch.where((i < lengths)[:, None], self.gru(x, h), h)
            out.append(h)
        return torch.stack(out, dim=1)

    def _decode(self, h: Tensor, gap: Tensor) -> Tensor:
        return self.decoder(torch.cat([h, gap.to(h.dtype)[..., None]], dim=-1))

    def predict(self, t: Tensor, y: Tensor, mask: Tensor, lengths: Tensor, t_out: Tensor) -> Tensor:
        """Answers at ``t_out`` (B, M) >= t[:, 0] (module doc): (B, M, D) standardized."""
        states = self.states(t, y, mask, lengths)
        width, hidden = t.shape[1], self.hidden
        valid = torch.arange(width, device=t.device)[None, :] < lengths[:, None]
        before = (t[:, None, :] < t_out[:, :, None]) & valid[:, None, :]  # (B, M, L)
        index = before.sum(dim=-1) - 1  # last observation strictly before each wanted time; -1: none
        safe = index.clamp_min(0)
        h_at = states.gather(1, safe[..., None].expand(-1, -1, hidden))
        inside = self._decode(h_at, t_out - t.gather(1, safe))
        start = (y[:, 0] * mask[:, 0])[:, None, :].expand_as(inside)
        inside = torch.where((index < 0)[..., None], start, inside)
        last = (lengths - 1)[:, None]
        t_last = t.gather(1, last)[:, 0]
        h = states.gather(1, last[..., None].expand(-1, 1, hidden))[:, 0]
        t_prev = t_last
        answers = []
        for m in range(t_out.shape[1]):  # after the last observation: feed predictions back, in time order
            after = t_out[:, m] > t_last
            if not bool(after.any()):
                answers.append(inside[:, m])
                continue
            gap = t_out[:, m] - t_prev
            pred = self._decode(h, gap)
            x = torch.cat([pred, torch.ones_like(pred), gap.to(pred.dtype)[:, None]], dim=1)
            h = torch.where(after[:, None], self.gru(x, h), h)
            t_prev = torch.where(after, t_out[:, m], t_prev)
            answers.append(torch.where(after[:, None], pred, inside[:, m]))
        return torch.stack(answers, dim=1)

    def loss(self, t: Tensor, y: Tensor, mask: Tensor, lengths: Tensor,
             generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """MSE of the one-step-ahead predictions ŷ(t_{i+1}) = g([h_i, t_{i+1} − t_i]) over observed
        entries (padding is masked out). No record metrics."""
        states = self.states(t, y, mask, lengths)
        pred = self._decode(states[:, :-1], t[:, 1:] - t[:, :-1])
        return masked_mse(pred, y[:, 1:], mask[:, 1:]), {}
