"""Step-size control: Hairer's initial step and the PI controller.

Only this module decides step sizes, so a per-sample controller (one step size per batch element)
can replace it without touching the RK step or the loop's bookkeeping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PIController", "initial_step_size"]


@dataclass
class PIController:
    """Proportional–integral step-size controller (Gustafsson 1991; HNW II §IV.2; dopri5.f).

    ``h_new = h · clip(safety · r^(-α) · r_prev^β, dfactor, ifactor)`` with r the error ratio of this
    step, r_prev that of the last accepted step, α = 1/k - 0.75β and k = error_order + 1.
    β = 0 is the classic I controller. After a rejection the step never grows.
    """

    error_order: int
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    beta: float = 0.0
    _prev: float = 1e-4

    def __post_init__(self) -> None:
        if not (0 < self.safety <= 1):
            raise ValueError(f"safety must be in (0, 1], got {self.safety}")
        if not (self.ifactor >= 1 and 0 < self.dfactor <= 1):
            raise ValueError(f"need ifactor >= 1 and 0 < dfactor <= 1, got {self.ifactor}, {self.dfactor}")
        if not (0 <= self.beta < 0.2):
            raise ValueError(f"beta (PI coefficient) must be in [0, 0.2), got {self.beta}")
        self.alpha = 1.0 / (self.error_order + 1) - 0.75 * self.beta

    def accept(self, h: float, ratio: float) -> float:
        """Next |h| after an accepted step with error ratio ``ratio`` (<= 1)."""
        if ratio == 0.0:
            fac = self.ifactor
        else:
            fac = self.safety * ratio ** (-self.alpha) * self._prev**self.beta
            fac = min(self.ifactor, max(self.dfactor, fac))
        self._prev = max(ratio, 1e-4)
        return h * fac

    def reject(self, h: float, ratio: float) -> float:
        """Next |h| after a rejected step (ratio > 1)."""
        fac = self.safety * ratio ** (-1.0 / (self.error_order + 1))
        return h * min(1.0, max(self.dfactor, fac))


def initial_step_size(vf, t0: float, z0, f0, direction: float, span: float, order: int, norm,
                      on_nonfinite=None) -> float:
    """``z0`` flat (N,), ``f0`` in the field's work shape; returns |h| (float).

    ``on_nonfinite()`` is called when ‖y0‖ or ‖f0‖ comes out NaN/inf (a non-finite y0 or f0 —
    or a zero component with atol = 0); it raises for the former, returns for the latter.
    """
    f0 = f0.reshape(-1)
    return _initial_step_size(vf, t0, z0, f0, direction, span, order, norm, on_nonfinite)


def _initial_step_size(vf, t0, z0, f0, direction, span, order, norm, on_nonfinite=None) -> float:
    """Hairer's starting step (HNW I §II.4, "Starting step size"; one extra vector-field call).

    d0 = ‖y0‖, d1 = ‖f0‖ (weighted RMS); h0 = 0.01 d0/d1; explicit Euler probe of size h0 gives
    d2 ≈ ‖f'‖; h1 = (0.01 / max(d1, d2))^(1/(order+1)); h = min(100 h0, h1). Never longer than the
    interval, so the probe never evaluates the field outside [t0, t1].
    """
    z0, f0 = z0.detach(), f0.detach()
    scale = norm.scale(z0, None)
    d0, d1 = torch.stack([norm.rms(z0 / scale), norm.rms(f0 / scale)]).tolist()  # one host sync
    if on_nonfinite is not None and not (math.isfinite(d0) and math.isfinite(d1)):
        on_nonfinite()
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    h0 = min(h0, span)
    z1 = torch.add(z0, f0, alpha=direction * h0)
    f1 = vf(t0 + direction * h0, z1.view(vf.work_shape)).reshape(-1)
    d2 = float(norm.rms((f1.detach() - f0) / scale)) / h0
    if not math.isfinite(d2):
        return h0 * 1e-3
    dm = max(d1, d2)
    h1 = max(1e-6, h0 * 1e-3) if dm <= 1e-15 else (0.01 / dm) ** (1.0 / (order + 1))
    return min(100 * h0, h1, span)
