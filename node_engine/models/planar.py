"""Discrete planar normalizing flow (Rezende & Mohamed 2015, §4.1), the baseline of Chen et al. 2018 §4.1.

Each of K layers maps f(z) = z + û h(wᵀz + b), h = tanh, with log-determinant (matrix determinant
lemma, R&M eq. 11-12)
    log|det ∂f/∂z| = log|1 + h'(wᵀz + b) ûᵀw|.
Invertibility needs ûᵀw ≥ -1; R&M App. A enforce it with
    û = u + (m(wᵀu) - wᵀu) w/‖w‖²,  m(x) = -1 + softplus(x)   ⇒  ûᵀw = m(wᵀu) > -1.
The flow is generative: z_0 ~ N(0, I), x = f_K ∘ … ∘ f_1(z_0),
    log q(x) = log N(z_0; 0, I) - Σ_k log|det ∂f_k/∂z (z_{k-1})|.
R&M give no closed-form inverse, but it is exact by a 1-D root find: with a = wᵀz, y = f(z) gives
wᵀy = a + (ûᵀw) h(a + b), strictly increasing in a (slope 1 + ûᵀw h' > 0), so a is found by
safeguarded Newton inside [wᵀy - |ûᵀw|, wᵀy + |ûᵀw|] and z = y - û h(a + b). Hence log_prob of data works
too (maximum likelihood), not only density matching.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from node_engine.models.cnf import standard_normal_log_prob
from node_engine.specs import PlanarSection
from node_engine.stats import SolverStats

__all__ = ["PlanarFlow", "PlanarLayer"]

_MAX_ROOT_ITERATIONS = 200  # Newton converges in ~5-10; bisection fallback needs ≤ ~60 in float64


class PlanarLayer(nn.Module):
    """One planar layer on R^D (parameters u, w: (D,), b: scalar).

    Shapes: forward(z: (N, D)) -> (y (N, D), log|det| (N,)); inverse(y: (N, D)) -> z (N, D).
    """

    def __init__(self, dim: int):
        super().__init__()
        scale = 1.0 / math.sqrt(dim)
        self.u = nn.Parameter(torch.empty(dim).uniform_(-scale, scale))
        self.w = nn.Parameter(torch.empty(dim).uniform_(-scale, scale))
        self.b = nn.Parameter(torch.zeros(()))

    def u_hat(self) -> Tensor:
        """û with ûᵀw = -1 + softplus(wᵀu) > -1 (R&M 2015, App. A)."""
        wu = self.w @ self.u
        m = -1.0 + F.softplus(wu)
        return self.u + (m - wu) * self.w / (self.w @ self.w).clamp_min(torch.finfo(self.w.dtype).tiny)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        u_hat = self.u_hat()
        h = torch.tanh(z @ self.w + self.b)
        y = z + h[:, None] * u_hat
        logdet = torch.log1p((1.0 - h * h) * (u_hat @ self.w))
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        """Exact inverse: root of g(a) = a + (ûᵀw) h(a + b) - wᵀy by Newton's method safeguarded by
        bisection, then z = y - û h(a + b). Differentiable through one final Newton step (whose
        derivative at the root is the implicit-function derivative)."""
        u_hat = self.u_hat()
        m = u_hat @ self.w  # ûᵀw > -1, so g' = 1 + m h' > 0: one root, inside [c - |m|, c + |m|]
        c = y @ self.w
        with torch.no_grad():
            lo, hi = c - m.abs(), c + m.abs()
            a = c - m * torch.tanh(c + self.b)
            tol = 4 * torch.finfo(y.dtype).eps
            for _ in range(_MAX_ROOT_ITERATIONS):
                h = torch.tanh(a + self.b)
                g = a + m * h - c
                hi = torch.where(g > 0, a, hi)
                lo = torch.where(g < 0, a, lo)
                new = a - g / (1.0 + m * (1.0 - h * h))
                # a Newton step leaving the bracket (slope near 0 when m is near -1) is bisected instead
                new = torch.where(((new <= lo) | (new >= hi)) & (g != 0), 0.5 * (lo + hi), new)
                converged = bool(((new - a).abs() <= tol * (1.0 + a.abs())).all())
                a = new
                if converged:
                    break
        h0 = torch.tanh(a + self.b)
        a = a - (a + m * h0 - c) / (1.0 + m * (1.0 - h0 * h0))
        return y - torch.tanh(a + self.b)[:, None] * u_hat


class PlanarFlow(nn.Module):
    """K planar layers with a standard normal base (Rezende & Mohamed 2015).

    Same interface as ``CNF``: log_prob, sample, sample_and_log_prob, regularization, stats,
    set_tolerances. No ODE is solved, so ``stats`` stays at zero and tolerances are ignored.

    Args:
        dim: D.  num_layers: K ≥ 1.
    """

    def __init__(self, dim: int, num_layers: int = 8):
        super().__init__()
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers!r}")
        self.dim = int(dim)
        self.layers = nn.ModuleList(PlanarLayer(self.dim) for _ in range(int(num_layers)))
        self.stats = SolverStats()

    @classmethod
    def from_spec(cls, model_spec: Mapping[str, Any], solver_spec: Mapping[str, Any] | None, dim: int) -> "PlanarFlow":
        """Build from the job spec's ``model`` dict (type "planar"; ``num_layers``, default from
        ``node_engine.specs.PlanarSection``). ``solver_spec`` is accepted for a uniform interface and unused.

        Raises:
            ValueError: num_layers out of bounds.
        """
        return cls(dim, PlanarSection.from_spec(model_spec, strict=False).num_layers)

    def set_tolerances(self, rtol: float, atol: float) -> None:
        """No-op (no ODE solve); kept for the common flow interface."""

    def use_solver(self, solver: Any) -> None:
        """No-op (no ODE solve); kept for the common model interface."""

    def regularization(self) -> dict[str, Tensor]:
        """Always empty: RNODE terms do not apply to discrete flows."""
        return {}

    def _check_points(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected points of shape (N, {self.dim}), got {tuple(x.shape)}")

    def _base_samples(self, n: int, generator: torch.Generator | None) -> Tensor:
        if int(n) < 1:
            raise ValueError(f"number of samples must be >= 1, got {n!r}")
        ref = self.layers[0].u
        # drawn on the generator's device (a CPU generator: the same points on every device)
        where = generator.device if generator is not None else ref.device
        return torch.randn(int(n), self.dim, generator=generator, dtype=ref.dtype, device=where).to(ref.device)

    def from_base(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """x = f_K ∘ … ∘ f_1(z) and Σ_k log|det| along the way: (N, D) -> ((N, D), (N,))."""
        self._check_points(z)
        total = z.new_zeros(z.shape[0])
        for layer in self.layers:
            z, logdet = layer(z)
            total = total + logdet
        return z, total

    def to_base(self, x: Tensor) -> Tensor:
        """z_0 = f_1⁻¹ ∘ … ∘ f_K⁻¹(x) by exact per-layer inversion: (N, D) -> (N, D)."""
        self._check_points(x)
        for layer in reversed(self.layers):
            x = layer.inverse(x)
        return x

    def log_prob(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """log q(x) in nats = log N(z_0) - Σ_k log|det ∂f_k/∂z(z_{k-1})|, z_0 from exact inversion.

        Args:
            x: (N, D).  generator: unused (interface of CNF).
        Returns:
            (N,) nats, differentiable in the parameters.
        Raises:
            ValueError: x is not (N, D).
        """
        z0 = self.to_base(x)
        _, logdet = self.from_base(z0)
        return standard_normal_log_prob(z0) - logdet

    def generate(self, z0: Tensor) -> Tensor:
        """Data points of base points z0: (N, D) -> (N, D) (the same as CNF.generate)."""
        return self.from_base(z0)[0]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples (n, D) from the flow (no gradient)."""
        return self.from_base(self._base_samples(n, generator))[0]

    def sample_and_log_prob(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x (n, D), log q(x) (n,) nats), differentiable (reparameterized) for density matching."""
        z0 = self._base_samples(n, generator)
        x, logdet = self.from_base(z0)
        return x, standard_normal_log_prob(z0) - logdet
