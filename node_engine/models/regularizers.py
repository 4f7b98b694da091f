"""RNODE regularizers (Finlay et al. 2020, "How to train your neural ODE", eqs. 5 and 9).

Both are integrals along the trajectory, appended to the ODE state as extra channels:
    kinetic energy      K = ∫_0^T ‖f(z(t), t)‖² dt
    Jacobian Frobenius  B = ∫_0^T ‖∂f/∂z (z(t), t)‖_F² dt ≈ ∫_0^T ‖εᵀ ∂f/∂z‖² dt  (E[εεᵀ] = I)
With the exact trace on ConcatSquash fields, B uses the exact ‖∂f/∂z‖_F² from the same forward-mode
tangents that give the trace (``ConcatSquashField.jacobian_trace``); with Hutchinson, the VJP estimate.
They favour straight, slowly varying trajectories (optimal-transport-like), which need fewer solver
steps; the loss adds λ_K·mean(K) + λ_B·mean(B) over the batch. Their channels only record the
integrals, so they are excluded from the step-size control (see ``cnf.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["RNODEWeights", "kinetic_energy_integrand", "jacobian_frobenius_integrand"]


@dataclass(frozen=True)
class RNODEWeights:
    """Weights λ_K (``kinetic_energy``) and λ_B (``jacobian_norm``) of the RNODE terms, both ≥ 0."""

    kinetic_energy: float = 0.0
    jacobian_norm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("kinetic_energy", "jacobian_norm"):
            value = getattr(self, name)
            if not (value >= 0.0) or value != value or value == float("inf"):
                raise ValueError(f"RNODE weight {name} must be a finite number >= 0, got {value!r}")

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the terms with a positive weight, in state-channel order."""
        return tuple(n for n in ("kinetic_energy", "jacobian_norm") if getattr(self, n) > 0.0)


def kinetic_energy_integrand(f: Tensor) -> Tensor:
    """‖f‖² per sample. f: (N, D) -> (N,)."""
    return f.pow(2).sum(dim=1)


def jacobian_frobenius_integrand(vjp: Tensor) -> Tensor:
    """‖εᵀ ∂f/∂z‖² per sample, an unbiased estimate of ‖∂f/∂z‖_F². vjp: (N, D) -> (N,)."""
    return vjp.pow(2).sum(dim=1)
