"""Step-size control: Hairer's initial step and the PI controller, per row.

Only this module decides step sizes. Both work on one error ratio per row: a float for a joint
solve (one row), a (B,) numpy array per sample (see :mod:`.rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .rows import any_, clip, isfinite, maximum, minimum, not_, to_device, where

__all__ = ["PIController", "initial_step_size"]

NONFINITE_SHRINK = 0.1  # a trial step with a NaN/inf error: retry 10x smaller


@dataclass
class PIController:
    """Proportional–integral step-size controller (Gustafsson 1991; HNW II §IV.2; dopri5.f).

    ``h_new = h · clip(safety · r^(-α) · r_prev^β, dfactor, ifactor)`` with r the error ratio of this
    step, r_prev that of the row's last accepted step, α = 1/k - 0.75β and k = error_order + 1.
    β = 0 is the classic I controller (scipy/torchdiffeq; the default: NFE stay comparable),
    β = 0.04 Hairer's dopri5.f. A rejected step is retried with a smaller one (the factor is
    capped at 1); after a NaN/inf error it shrinks tenfold.
    """

    error_order: int
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    beta: float = 0.0

    def __post_init__(self) -> None:
        if not (0 < self.safety <= 1):
            raise ValueError(f"safety must be in (0, 1], got {self.safety}")
        if not (self.ifactor >= 1 and 0 < self.dfactor <= 1):
            raise ValueError(f"need ifactor >= 1 and 0 < dfactor <= 1, got {self.ifactor}, {self.dfactor}")
        if not (0 <= self.beta < 0.2):
            raise ValueError(f"beta (PI coefficient) must be in [0, 0.2), got {self.beta}")
        self.alpha = 1.0 / (self.error_order + 1) - 0.75 * self.beta
        self._reject_exp = -1.0 / (self.error_order + 1)

    def adapt(self, h, ratio, prev):
        """One decision per row: ``(accept, h_next, prev_next)``.

        Args:
            h: |step| just tried; ratio: its error ratio (accept iff <= 1; NaN/inf allowed);
            prev: the ratio of the row's last accepted step (start: 1e-4).
        Returns:
            accept (bool per row), the next |h| per row, and the updated ``prev``.
        """
        accept = ratio <= 1.0
        zero = ratio == 0.0
        r = where(zero, 1.0, ratio)  # 0 ** -α is not a float; such a step grows by ifactor
        grow = where(zero, self.ifactor, clip(self.safety * r ** (-self.alpha) * prev**self.beta,
                                              self.dfactor, self.ifactor))
        shrink = where(isfinite(ratio), clip(self.safety * r ** self._reject_exp, self.dfactor, 1.0),
                       NONFINITE_SHRINK)
        return accept, h * where(accept, grow, shrink), where(accept, maximum(ratio, 1e-4), prev)


def initial_step_size(vf, t0, z0, f0, direction: float, span, order: int, norm, on_suspicious):
    """Hairer's starting step (HNW I §II.4, "Starting step size"; one extra vector-field call), per row.

    d0 = ‖y0‖, d1 = ‖f0‖ (weighted RMS); h0 = 0.01 d0/d1; explicit Euler probe of size h0 gives
    d2 ≈ ‖f'‖; h1 = (0.01 / max(d1, d2))^(1/(order+1)); h = min(100 h0, h1). Never longer than
    ``span``, so the probe never evaluates the field outside [t0, t1].

    Args:
        vf: the field wrapper (``vf.at(t, z)`` takes host times and solver-shaped states).
        t0, span: host times (float, or (B,) arrays per row); z0 solver-shaped ((N,) or (B, D));
        f0 = f(t0, z0) (any shape with z0's numel).
        on_suspicious: called (before the probe) when a row's ‖y0‖ or ‖f0‖ comes out NaN/inf (a
            non-finite y0 or f0 — or a zero component with atol = 0): it checks exactly and raises
            or marks the rows failed; Hairer's norms double as the NaN/inf check of the start.
    Returns:
        |h| per row (host float/array). One host synchronisation for d0, d1 and one for d2.
    """
    with torch.no_grad():
        z0, f0 = z0.detach(), f0.detach().reshape(z0.shape)
        scale = norm.scale(z0, None)
        d = torch.stack([norm.rms(z0 / scale), norm.rms(f0 / scale)]).cpu().double().numpy()
        d0, d1 = (float(d[0]), float(d[1])) if d.ndim == 1 else (d[0], d[1])
        if any_(not_(isfinite(d0) & isfinite(d1))):
            on_suspicious()
        with np.errstate(all="ignore"):
            h0 = minimum(where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / where(d1 == 0, 1.0, d1)), span)
            z1 = _axpy(z0, f0, direction * h0)
            f1 = vf.at(t0 + direction * h0, z1).reshape(z0.shape)
            d2 = norm.rms((f1 - f0) / scale)
            d2 = (float(d2) if d2.dim() == 0 else d2.cpu().double().numpy()) / where(h0 == 0, math.nan, h0)
            dm = maximum(d1, d2)
            h1 = where(dm <= 1e-15, maximum(1e-6, h0 * 1e-3), (0.01 / where(dm <= 1e-15, 1.0, dm)) ** (1.0 / (order + 1)))
            h = minimum(minimum(100 * h0, h1), span)
            return where(isfinite(d2), h, h0 * 1e-3)


def _axpy(z: torch.Tensor, f: torch.Tensor, a) -> torch.Tensor:
    """z + a f with a float, or a (B,) host array scaling each row."""
    if isinstance(a, np.ndarray):
        return torch.addcmul(z, to_device(a, z.device, z.dtype).unsqueeze(1), f)
    return torch.add(z, f, alpha=a)
