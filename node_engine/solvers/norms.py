"""Error norms for step-size control.

The weighted error of a trial step is ``e_i / (atol_i + rtol_i · max(|y0_i|, |y1_i|))`` (Hairer,
Nørsett, Wanner, *Solving ODEs I*, §II.4, eq. (4.11)); its size is the RMS over components. A
state made of several parts (tuple members; the adjoint's [y, a, θ]) uses the *mixed* norm, the
maximum over parts of each part's RMS (as torchdiffeq), so a big part cannot drown a small one.
The *seminorm* (Kidger, Chen, Lyons, "Hey, that's not an ODE", ICML 2021) leaves parts out of the
norm: for the adjoint, the parameter part.
"""

from __future__ import annotations

import torch

__all__ = ["ErrorNorm"]


class ErrorNorm:
    """Mixed RMS error norm over segments of a flat state.

    Args:
        rtol, atol: floats, or (N,) tensors (per-component tolerances) on the state's device.
        segments: lengths of the parts of the flat state (sum = N), or None for one part.
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
        if segments is not None:
            self.n_used = sum(n for n, u in zip(segments, used) if u)
            # contiguous prefix of used segments is the fast common case (seminorm drops the tail)
            k = 0
            while k < len(used) and used[k]:
                k += 1
            self.prefix = all(not u for u in used[k:])

    def _abs(self, z: torch.Tensor) -> torch.Tensor:
        # |z_new| of an accepted step is |z0| of the next one: computed once
        if z is self._last_z:
            return self._last_abs
        return z.abs()

    def scale(self, y0: torch.Tensor, y1: torch.Tensor | None) -> torch.Tensor:
        """atol + rtol · max(|y0|, |y1|), shape (N,)."""
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
        """Mean of squares of the weighted vector v, per used segment: shape () or (n_seg,)."""
        if self.segments is None:
            return torch.linalg.vector_norm(v).square_().div_(v.numel())
        parts = torch.split(v, self.segments)
        return torch.stack([p.square().mean() for p, u in zip(parts, self.used) if u])

    def rms(self, v: torch.Tensor) -> torch.Tensor:
        """Mixed RMS of v (already divided by the scale): max over used segments. 0-d tensor."""
        if self.segments is None:
            return torch.linalg.vector_norm(v).div_(self._sqrt_n(v))
        return self.mean_squares(v).max().sqrt()

    def _sqrt_n(self, v) -> float:
        return v.numel() ** 0.5

    def ratio(self, y0, y1, err: torch.Tensor, err3: torch.Tensor | None = None) -> float:
        """Error ratio of a trial step (accept iff <= 1) for the error estimate(s) ``err`` (N,)
        *without* the factor |h| (multiply the result by |h|); NaN/inf if anything was.
        ``err`` is overwritten. One host synchronisation.

        ``err3`` (DOP853): combined as err5² / sqrt(err5² + 0.01 err3²) per segment (HNW I eq. 10.17).
        """
        s = self.scale(y0, y1)
        if err3 is None:
            if self.segments is None:
                return float(torch.linalg.vector_norm(err.div_(s))) / self._sqrt_n(err)
            return float(self.rms(err.div_(s)))
        m5 = self.mean_squares(err.div_(s))
        m3 = self.mean_squares(err3.div_(s))
        r = m5 / (m5 + 0.01 * m3).sqrt()
        r = torch.nan_to_num(r, nan=0.0) if bool((m5 == 0).any()) else r
        return float(r if r.dim() == 0 else r.max())
