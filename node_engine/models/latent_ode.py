"""Latent ODE with an ODE-RNN encoder (Rubanova et al. 2019, "Latent ODEs for irregularly-sampled time
series"; Chen et al. 2018 §5).

Generative model of a series observed at times t_0 < ... < t_{L-1} (values standardized per feature):

    z0 ~ p(z0) = N(0, I),   dz/dt = f_θ(z),   y_i ~ N(g_θ(z(t_i)), σ² I)   on the observed entries,

with f_θ an autonomous tanh MLP (the ODE functions of Rubanova et al.; Chen et al.'s ``LatentODEfunc``
uses ELU, whose kink cost adaptive solves accuracy: adjoint and backprop gradients agreed to only
~1e-5 at rtol 1e-10, ~1e-9 with tanh) and the decoder g_θ a one-hidden-layer MLP. z0 lives at the series' first observation time t_0; the field has no time input, so a series
is solved in its own relative time s = t − t_0.

Recognition model q_φ(z0 | y) = N(μ, diag(s²)) from an ODE-RNN run backwards in time (Rubanova et
al. 2019, Algorithm 1, reversed): h starts at 0 at the last observation; at each observation
(latest first) the hidden state is evolved by dh/dt = f_φ(h) from the later observation's time to
this one (``odeint`` per sample: each series its own times) and then updated by a GRU cell with
input [y_i ⊙ m_i, m_i] (m the mask; a point with no observed entry leaves h unchanged). After t_0,
(μ, s) = (W h)'s two halves, s through a softplus.

Loss: the negative ELBO (Kingma & Welling 2014) per series,

    −ELBO = −E_q[log p(y | z0)] + β · KL(q(z0 | y) ‖ N(0, I)),

the expectation by ``elbo_samples`` reparameterized draws z0 = μ + s ⊙ ε, log p(y | z0) summed
over observed entries (:func:`gaussian_log_likelihood`), the KL in closed form
(:func:`kl_to_standard_normal`), and β the KL annealing weight: min(1, step / ``kl_anneal_steps``)
(linear warm-up of the KL term; Bowman et al. 2016), counted by the model's ``train_steps`` buffer
(saved with checkpoints, so a resumed run continues the ramp). The batch loss is the sum over its
series divided by the number of observed entries.

Which observations the encoder reads: in training and evaluation it reads each series' fitted
share (its first ``context_lengths`` points, ``CONTEXT_FRACTION`` of them), and the likelihood
(resp. the error) covers every point: the model learns to reconstruct its context and to
extrapolate beyond it, which is what ``test_extrap_mse`` measures. A forecast request's
observations are all read (a user sends what they know).

Gradients: the ODE-RNN encoder backpropagates through its short per-sample solves. The latent
trajectory (the long solve) follows ``solver.adjoint``: with the adjoint (Chen et al. 2018) the
batch is solved jointly on the union of its rows' relative times (the engine's adjoint takes one
grid), else by backprop through a per-sample solve. Evaluation and serving solve per sample, so a
series' answer does not depend on the other rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from node_engine.adjoint import odeint_adjoint
from node_engine.models.series import SeriesModel, context_lengths, start_grid, take
from node_engine.odeint import odeint
from node_engine.specs import LatentODESection, SolverSection

__all__ = ["AutonomousField", "ODERNNEncoder", "LatentODE", "gaussian_log_likelihood", "kl_to_standard_normal"]

STD_FLOOR = 1e-4  #: lower bound on q's standard deviations (keeps log s finite)


def gaussian_log_likelihood(y: Tensor, mean: Tensor, mask: Tensor, std: float) -> Tensor:
    """Σ over observed entries of log N(y; mean, std²): (..., L, D) -> (...) nats.

    log N(y; m, σ²) = −½ log(2πσ²) − (y − m)² / (2σ²), summed over the last two dims where ``mask`` is 1.
    """
    log_norm = -0.5 * math.log(2.0 * math.pi * std ** 2)
    return ((log_norm - (y - mean) ** 2 / (2.0 * std ** 2)) * mask).sum(dim=(-2, -1))


def kl_to_standard_normal(mu: Tensor, std: Tensor) -> Tensor:
    """KL(N(μ, diag(s²)) ‖ N(0, I)) = ½ Σ_k (μ_k² + s_k² − 1 − 2 log s_k): (B, Z) -> (B,) nats."""
    return 0.5 * (mu ** 2 + std ** 2 - 1.0 - 2.0 * torch.log(std)).sum(dim=-1)


class AutonomousField(nn.Module):
    """dz/dt = f(z), an MLP Z -> H -> H -> Z with tanh (smooth: see the module doc).

    ``forward(t, z)``: ``t`` is ignored (any shape: per-sample solves pass (B,)); ``z`` (B, Z) -> (B, Z)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, dim))

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(z)


class ODERNNEncoder(nn.Module):
    """q(z0 | observations): an ODE-RNN (Rubanova et al. 2019) run from the last observation to the first.

    Attributes: ``gru`` (GRU cell, input 2D: [y ⊙ m, m]), ``field`` (dh/dt = f(h)), ``out`` (h -> 2Z).
    """

    def __init__(self, dim: int, rec_hidden: int, hidden: int, latent_dim: int):
        super().__init__()
        self.rec_hidden = rec_hidden
        self.gru = nn.GRUCell(2 * dim, rec_hidden)
        self.field = AutonomousField(rec_hidden, hidden)
        self.out = nn.Linear(rec_hidden, 2 * latent_dim)

    def hidden(self, t: Tensor, y: Tensor, mask: Tensor, lengths: Tensor, evolve) -> Tensor:
        """The ODE-RNN state at each row's first observation: (B, rec_hidden).

        Args:
            t (B, L), y (B, L, D), mask (B, L, D), lengths (B,): see ``node_engine.models.series``.
            evolve: ``evolve(field, h (R, H), grid (R, 2)) -> h (R, H)`` at ``grid[:, 1]``, each row
                solved from ``grid[r, 0]`` (its later observation) back to ``grid[r, 1]``.
        Values at masked-out entries are never read (the GRU sees y ⊙ m).
        """
        batch, width = t.shape
        h = y.new_zeros(batch, self.rec_hidden)
        for j in reversed(range(width)):
            if j + 1 < width:  # evolve rows that hold a later observation back to t_j
                rows = torch.nonzero(j + 1 < lengths).squeeze(1)
                if rows.numel():
                    grid = torch.stack([t[rows, j + 1], t[rows, j]], dim=1)
                    h = h.index_copy(0, rows, evolve(self.field, h[rows], grid))
            m = mask[:, j]
            update = (j < lengths) & (m.sum(dim=1) > 0)  # a point with nothing observed leaves h as it is
            if bool(update.any()):
                h = torch.where(update[:, None], self.gru(torch.cat([y[:, j] * m, m], dim=1), h), h)
        return h

    def forward(self, t: Tensor, y: Tensor, mask: Tensor, lengths: Tensor, evolve) -> tuple[Tensor, Tensor]:
        """(μ (B, Z), s (B, Z)) of q(z0 | the first ``lengths[b]`` observations of each row)."""
        mu, raw = self.out(self.hidden(t, y, mask, lengths, evolve)).chunk(2, dim=-1)
        return mu, nn.functional.softplus(raw) + STD_FLOOR


class LatentODE(SeriesModel):
    """Latent ODE model (module doc). Attributes: ``dim`` D, ``latent_dim`` Z, ``encoder``, ``field``
    (f_θ), ``decoder`` (g_θ), ``obs_std`` σ, ``kl_anneal_steps``, ``elbo_samples``, ``solver``,
    ``stats`` (NFE of every solve, encoder and latent), ``train_steps`` (buffer: loss calls in training)."""

    name = "latent_ode"
    needs_observed_start = False  #: the encoder reads any observed entries; no fully observed start needed

    def __init__(self, dim: int, spec: LatentODESection, solver: SolverSection):
        super().__init__(solver)
        self.dim, self.latent_dim = dim, spec.latent_dim
        self.obs_std, self.kl_anneal_steps, self.elbo_samples = spec.obs_std, spec.kl_anneal_steps, spec.elbo_samples
        self.encoder = ODERNNEncoder(dim, spec.rec_hidden, spec.hidden, spec.latent_dim)
        self.field = AutonomousField(spec.latent_dim, spec.hidden)
        self.decoder = nn.Sequential(nn.Linear(spec.latent_dim, spec.hidden), nn.ReLU(), nn.Linear(spec.hidden, dim))
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.int64))

    @classmethod
    def from_spec(cls, model_spec: Mapping[str, Any], solver_spec: Mapping[str, Any] | None, dim: int) -> "LatentODE":
        """Raises ValueError for bad options (``node_engine.specs.LatentODESection``) or a fixed-grid method."""
        return cls(dim, LatentODESection.from_spec(model_spec, strict=False),
                   SolverSection.from_spec(solver_spec, strict=False))

    # ---- solves -------------------------------------------------------------------------------
    def _per_sample(self, field: nn.Module, h0: Tensor, grid: Tensor) -> Tensor:
        """``odeint`` with each row on its own grid (B, T): returns (B, T, ...)."""
        options = {**self.solver.solver_options(), "step_control": "per_sample"}
        out = odeint(field, h0, grid.to(h0.dtype), rtol=self.solver.rtol, atol=self.solver.atol,
                     method=self.solver.method, options=options, stats=self.stats)
        return out.transpose(0, 1)

    def _evolve(self, field: nn.Module, h: Tensor, grid: Tensor) -> Tensor:
        return self._per_sample(field, h, grid)[:, -1]

    def latent_path(self, z0: Tensor, s: Tensor) -> Tensor:
        """z(s) from z(0) = ``z0`` (R, Z) at relative times ``s`` (R, M) >= 0, rows increasing: (R, M, Z)."""
        grid, index = start_grid(torch.zeros_like(s[:, 0]), s)
        if self.solver.adjoint and torch.is_grad_enabled():
            # the engine's adjoint takes one grid: solve the batch jointly on the union of its rows' times
            union, inverse = torch.unique(grid.detach(), sorted=True, return_inverse=True)
            params = tuple(p for p in self.field.parameters() if p.requires_grad)
            options = self.solver.solver_options()
            out = odeint_adjoint(self.field, z0, union, rtol=self.solver.rtol, atol=self.solver.atol,
                                 method=self.solver.method, options=options, adjoint_params=params,
                                 adjoint_options={**options, "norm": self.solver.adjoint_norm}
                                 if self.solver.adjoint_mode == "backsolve" else None,
                                 adjoint_mode=self.solver.adjoint_mode, stats=self.stats)  # (U, R, Z)
            rows = torch.arange(z0.shape[0], device=z0.device)[:, None]
            path = out[inverse, rows]  # (R, M + 1, Z)
        else:
            path = self._per_sample(self.field, z0, grid)
        return take(path, index)

    # ---- model --------------------------------------------------------------------------------
    def posterior(self, t: Tensor, y: Tensor, mask: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """q(z0 | the first ``lengths[b]`` observations of row b): (μ (B, Z), s (B, Z)), standardized data."""
        return self.encoder(t.to(y.dtype), y, mask, lengths, self._evolve)

    def decode_paths(self, z0: Tensor, t0: Tensor, t_out: Tensor) -> Tensor:
        """g(z(t_out)) for z(t0) = ``z0`` (R, Z), ``t0`` (R,), ``t_out`` (R, M) >= t0: (R, M, D)."""
        return self.decoder(self.latent_path(z0, t_out.to(z0.dtype) - t0.to(z0.dtype)[:, None]))

    def predict(self, t: Tensor, y: Tensor, mask: Tensor, lengths: Tensor, t_out: Tensor) -> Tensor:
        """Decoded trajectory of the posterior mean z0 = μ at ``t_out`` (B, M): (B, M, D) standardized."""
        mu, _ = self.posterior(t, y, mask, lengths)
        return self.decode_paths(mu, t[:, 0], t_out)

    def draw(self, t: Tensor, y: Tensor, mask: Tensor, lengths: Tensor, t_out: Tensor,
             eps: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and posterior draws: z0 = μ + s ⊙ ε for ``eps`` (k, B, Z).

        Returns:
            (mean (B, M, D) from z0 = μ, draws (k, B, M, D)), standardized units; all k·B + B rows are
            one per-sample solve, so a row's answer depends on its own inputs only.
        """
        mu, std = self.posterior(t, y, mask, lengths)
        k, batch = eps.shape[0], mu.shape[0]
        z0 = torch.cat([mu, (mu[None] + std[None] * eps).reshape(k * batch, -1)])
        paths = self.decode_paths(z0, t[:, 0].repeat(k + 1), t_out.repeat(k + 1, 1))
        return paths[:batch], paths[batch:].reshape(k, batch, *paths.shape[1:])

    def kl_weight(self) -> float:
        """β = min(1, completed training steps / ``kl_anneal_steps``) (1 when no annealing)."""
        if self.kl_anneal_steps == 0:
            return 1.0
        return min(1.0, float(self.train_steps) / self.kl_anneal_steps)

    def loss(self, t: Tensor, y: Tensor, mask: Tensor, lengths: Tensor,
             generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Negative ELBO per observed entry of a batch (module doc); the encoder reads each series'
        fitted share (``context_lengths``), the likelihood covers all its points. Record metrics:
        ``kl`` (mean KL per series, nats), ``kl_weight`` β. In training mode each call is one step
        of the KL ramp."""
        mu, std = self.posterior(t, y, mask, context_lengths(lengths))
        draws, batch = self.elbo_samples, y.shape[0]
        eps = torch.randn((draws, *mu.shape), generator=generator).to(mu.device, mu.dtype)
        z0 = (mu[None] + std[None] * eps).reshape(draws * batch, -1)
        x = self.decode_paths(z0, t[:, 0].repeat(draws), t.repeat(draws, 1)).reshape(draws, *y.shape)
        log_lik = gaussian_log_likelihood(y, x, mask, self.obs_std).mean(dim=0)  # (B,): Monte Carlo over draws
        kl = kl_to_standard_normal(mu, std)
        beta = self.kl_weight()
        loss = -(log_lik - beta * kl).sum() / mask.sum().clamp_min(1.0)
        if self.training and torch.is_grad_enabled():
            self.train_steps += 1
        return loss, {"kl": float(kl.mean().detach()), "kl_weight": beta}
