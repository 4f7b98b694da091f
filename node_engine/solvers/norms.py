"""Error norms for step-size control: one error ratio per row.

The weighted error of a trial step is ``e_i / (atol_i + rtol_i · max(|y0_i|, |y1_i|))`` (Hairer,
Nørsett, Wanner, *Solving ODEs I*, §II.4, eq. (4.11)); its size is the RMS over a row's components
(the last dim: the whole flat state in joint mode, one sample's state in per-sample mode). A row
made of several parts (tuple members; the adjoint's [y, a, θ]) uses the *mixed* norm, the maximum
over parts of each part's RMS (as torchdiffeq), so a big part cannot drown a small one, and a part
with zero derivative never changes an accept/reject decision (only the initial-step estimate ‖y0‖). The *seminorm* (Kidger, Chen, Lyons, "Hey, that's
not an ODE", ICML 2021) leaves parts out of the norm: for the adjoint, the parameter part.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ErrorNorm", "error_ratio"]


class ErrorNorm:
    """Mixed RMS error norm over segments of the last dim of a (..., N) state.

    Args:
        rtol, atol: floats, or (N,) tensors (per-component tolerances of a row) on the state's device.
        segments: lengths of the parts of a row (sum = N), or None for one part.
        used: for each segment, whether it enters the norm (False = seminorm exclusion).
    """

    def __init__(self, rtol, atol, segments: list[int] | None = None, used: list[bool] | None = None):
        self.rtol = rtol
        self.atol = atol
        if segments is not None and used is None:
            used = [True] * len(segments)
        if segments is not None and all(used) and len(segments) == 1:
            segments = None
        self.segments = segments
        self.used = used
        self.covers_all = segments is None or all(used)  # every component enters the norm
        self._last_z = None
        self._last_abs = None
        self._atol_t = None

    def _abs(self, z: torch.Tensor) -> torch.Tensor:
        # |z_new| of an accepted step is |z0| of the next one: computed once
        if z is self._last_z:
            return self._last_abs
        return z.abs()

    def scale(self, y0: torch.Tensor, y1: torch.Tensor | None) -> torch.Tensor:
        """atol + rtol · max(|y0|, |y1|), y0's shape."""
        if y1 is None:
            m = y0.abs()
        else:
            a1 = y1.abs()
            m = torch.maximum(self._abs(y0), a1)
            self._last_z, self._last_abs = y1, a1
        rtol, atol = self.rtol, self.atol
        if isinstance(rtol, torch.Tensor) or isinstance(atol, torch.Tensor):
            if not isinstance(atol, torch.Tensor):
                return torch.mul(m, rtol).add_(atol)
            return torch.addcmul(atol, m, rtol) if isinstance(rtol, torch.Tensor) else torch.add(atol, m, alpha=rtol)
        if self._atol_t is None or self._atol_t.device != m.device or self._atol_t.dtype != m.dtype:
            self._atol_t = torch.tensor(atol, dtype=m.dtype, device=m.device)
        return torch.add(self._atol_t, m, alpha=rtol)

    def mean_squares(self, v: torch.Tensor) -> torch.Tensor:
        """Mean of squares of the weighted v per row and used segment: (..., n_seg)."""
        return _mean_squares(v, self.segments, self.used)

    def rms(self, v: torch.Tensor) -> torch.Tensor:
        """Mixed RMS per row of v (already divided by the scale): v's leading shape, on its device."""
        return _rms(v, self.segments, self.used)

    def ratio(self, y0, y1, err: torch.Tensor, err3: torch.Tensor | None = None) -> np.ndarray:
        """Error ratio of a trial step per row (accept iff <= 1) for the error estimate(s) ``err``
        *without* the factor |h| (multiply the result by |h|): a float64 numpy array of the leading
        shape ((B,) or () for a joint state); NaN/inf if anything was. ``err`` is overwritten.
        One host synchronisation.

        ``err3`` (DOP853): combined as err5² / sqrt(err5² + 0.01 err3²) per segment (HNW I eq. 10.17).
        """
        s = self.scale(y0, y1)
        if err3 is None:
            if self.segments is None:
                # the division by sqrt(N) on the host: the same rounding as a float's
                return _host(torch.linalg.vector_norm(err.div_(s), dim=-1)) / err.shape[-1] ** 0.5
            return _host(self.rms(err.div_(s)))
        m5 = self.mean_squares(err.div_(s))
        m3 = self.mean_squares(err3.div_(s))
        r = torch.where(m5 == 0, 0.0, m5 / (m5 + 0.01 * m3).sqrt())
        return _host(r.amax(-1))


def _mean_squares(v: torch.Tensor, segments, used) -> torch.Tensor:
    if segments is None:
        return torch.linalg.vector_norm(v, dim=-1, keepdim=True).square_().div_(v.shape[-1])
    parts = torch.split(v, list(segments), dim=-1)
    return torch.stack([p.square().mean(-1) for p, u in zip(parts, used) if u], -1)


def _rms(v: torch.Tensor, segments, used) -> torch.Tensor:
    if segments is None:
        return torch.linalg.vector_norm(v, dim=-1).div_(v.shape[-1] ** 0.5)
    return _mean_squares(v, segments, used).amax(-1).sqrt()


def error_ratio(y0: torch.Tensor, y1: torch.Tensor, err: torch.Tensor, err3: torch.Tensor | None, rtol, atol,
                segments=None, used=None) -> torch.Tensor:
    """:meth:`ErrorNorm.ratio` as a pure tensor function (no host sync, no cached state, inputs
    untouched), for the compiled trial step (:mod:`.compiled_step`): ``err`` already includes the
    step's h. y0, y1, err, err3: (..., N); rtol/atol floats or (N,) tensors; ``segments``/``used``
    as :class:`ErrorNorm`'s (after its normalisation). Returns the ratio per row, (...), on the device."""
    v = err / (atol + rtol * torch.maximum(y0.abs(), y1.abs()))
    if err3 is None:
        return _rms(v, segments, used)
    v3 = err3 / (atol + rtol * torch.maximum(y0.abs(), y1.abs()))
    m5, m3 = _mean_squares(v, segments, used), _mean_squares(v3, segments, used)
    return torch.where(m5 == 0, 0.0, m5 / (m5 + 0.01 * m3).sqrt()).amax(-1)


def _host(x: torch.Tensor):
    """A device tensor on the host (the synchronisation point): a float for a 0-d tensor (a joint
    solve's one row), else a float64 numpy array."""
    if x.dim() == 0:
        return float(x)
    return x.detach().cpu().numpy().astype(np.float64)
