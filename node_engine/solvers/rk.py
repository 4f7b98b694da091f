"""One explicit Runge–Kutta step on a flat state, and its dense output.

Stage i is ``k_i = f(t + c_i h, z + h Σ_j a_ij k_j)``; the stages live in one (s, N) buffer, so
each stage combination is a single ``addmv`` (no Python sum over stages), and so are the new state
and the error estimate. Without autograd the buffer, its slices and the stage-input buffers are
made once per solve (``addmv(..., out=)``), so a stage costs the field call plus two kernels.
The same code rebuilds a step's graph in the checkpoint adjoint (fresh buffers per step).
Dense output: ``y(t + θh) = y + h Σ_j b_j(θ) k_j`` with the polynomial weights ``b_j(θ)``
evaluated on the host by Horner's rule, then one ``addmm`` for all output times inside the step.
"""

from __future__ import annotations

import numpy as np
import torch

from .tableau import ButcherTableau

__all__ = ["RKStepper", "acquire_stepper", "release_stepper"]

# Reuse-mode steppers (stage buffer + its precomputed views) are pooled between solves: building
# them costs ~30 tensor views, a visible share of a small solve. A pooled stepper is taken out of
# the pool while in use, so nested or concurrent solves never share a buffer.
_POOL: dict[tuple, list["RKStepper"]] = {}
_POOL_MAX_BYTES = 64 * 2**20  # total size of the pooled stage buffers
_pool_bytes = 0


def _nbytes(st: "RKStepper") -> int:
    return (st.K.numel() + st.n) * st.K.element_size()  # stage buffer + stage input


def acquire_stepper(tab, work_shape, device, dtype) -> "RKStepper":
    """A reuse-mode (no autograd) stepper for this shape/device/dtype, from the pool if possible."""
    global _pool_bytes
    key = (tab.name, id(tab), tuple(work_shape), str(device), dtype)
    free = _POOL.get(key)
    if free:
        try:
            st = free.pop()
        except IndexError:  # another thread took it
            pass
        else:
            _pool_bytes -= _nbytes(st)
            return st
    st = RKStepper(tab, work_shape, device, dtype, reuse_buffer=True)
    st._pool_key = key
    return st


def release_stepper(st: "RKStepper") -> None:
    """Return a stepper from :func:`acquire_stepper` (call once, when the solve is over). Kept
    only while the pool stays under its byte budget (oldest shapes are dropped first)."""
    global _pool_bytes
    key = getattr(st, "_pool_key", None)
    size = _nbytes(st)
    if key is None or size > _POOL_MAX_BYTES:
        return
    while _pool_bytes + size > _POOL_MAX_BYTES and _POOL:
        old_key = next(iter(_POOL))
        for old in _POOL.pop(old_key, []):
            _pool_bytes -= _nbytes(old)
    free = _POOL.setdefault(key, [])
    if len(free) < 2:
        free.append(st)
        _pool_bytes += size


class RKStepper:
    """Runs steps of one tableau on flat states of length N (device/dtype fixed per solve).

    Args:
        tab: the method.
        work_shape: the shape the field wrapper takes and returns (y's shape; (N,) for tuples).
        reuse_buffer: keep one stage buffer for the whole solve (no autograd graph is built);
            False allocates a fresh buffer per step so autograd can record through it.
    """

    def __init__(self, tab: ButcherTableau, work_shape, device, dtype, *, reuse_buffer: bool):
        self.tab = tab
        self.s = tab.stages
        self.n_total = self.s + len(tab.extra_c)
        self.c = tab.c
        self.fsal = tab.fsal
        self.tt = tab.to(device, dtype)
        self.a_rows = self.tt.a_rows
        self._a21 = float(tab.a[1][0]) if self.s > 1 else 0.0
        self.shape = torch.Size(work_shape)
        self.n = self.shape.numel()
        self.device = device
        self.dtype = dtype
        self.reuse = reuse_buffer
        self.dense_poly = None if tab.dense is None else np.array(tab.dense)  # (n_total, deg)
        self.K: torch.Tensor | None = None
        self._extra_done = False
        if reuse_buffer:
            K = torch.empty(self.n_total, self.n, device=device, dtype=dtype)
            # one stage-input buffer for all stages: the field has consumed stage i's input (its
            # output is copied into K) before stage i+1's is written; a smaller working set keeps
            # the field's own data in cache on large states
            Y = torch.empty(self.n, device=device, dtype=dtype)
            self.K = K
            self._KT = [None] + [K[:i].T for i in range(1, self.n_total + 1)]  # (N, i) views
            self._rows = [K[i].view(self.shape) for i in range(self.n_total)]
            self._Yf = [Y] * self.s
            self._Ys = [Y.view(self.shape)] * self.s

    def set_k1(self, k1: torch.Tensor) -> None:
        """Reuse mode: put f(t, z) into the buffer's first row (kept there across rejections)."""
        self._rows[0].copy_(k1)

    @property
    def last_stage(self) -> torch.Tensor:
        """The last stage k_s of the last step (= f(t_new, z_new) for FSAL methods), work shape."""
        return self._rows[self.s - 1] if self.reuse else self.K[self.s - 1].view(self.shape)

    def step(self, vf, t: float, t_new: float, t_end_eval: float, z: torch.Tensor, k1: torch.Tensor | None):
        """Trial step from (t, z) (z flat, (N,)) to t_new. ``k1 = f(t, z)`` in work shape; None in
        reuse mode means it is already in the buffer (``set_k1``). Stages with c = 1 are evaluated
        at ``t_end_eval`` (t_new, or just before a discontinuity). Returns z_new (N,), a new tensor.
        """
        h = t_new - t
        c, a, s = self.c, self.a_rows, self.s
        if self.reuse:
            KT, rows, Yf, Ys = self._KT, self._rows, self._Yf, self._Ys
            if k1 is not None:
                rows[0].copy_(k1)
            last = s - 1 if self.fsal else s
            for i in range(1, last):
                if i == 1:  # one previous stage: an axpy is 2-3x cheaper than a one-column gemv
                    torch.add(z, self.K[0], alpha=h * self._a21, out=Yf[1])
                else:
                    torch.addmv(z, KT[i], a[i], alpha=h, out=Yf[i])
                ci = c[i]
                rows[i].copy_(vf(t_end_eval if ci == 1.0 else t + ci * h, Ys[i]))
            if self.fsal:
                z_new = torch.addmv(z, KT[s - 1], a[s - 1], alpha=h)
                rows[s - 1].copy_(vf(t_end_eval, z_new.view(self.shape)))
            else:
                z_new = torch.addmv(z, KT[s], self.tt.b, alpha=h)
        else:
            K = torch.empty(self.n_total, self.n, device=self.device, dtype=self.dtype)
            K[0] = k1.reshape(-1)
            zi = z
            for i in range(1, s):
                zi = torch.addmv(z, K[:i].T, a[i], alpha=h)
                ci = c[i]
                K[i] = vf(t_end_eval if ci == 1.0 else t + ci * h, zi.view(self.shape)).reshape(-1)
            z_new = zi if self.fsal else torch.addmv(z, K[:s].T, self.tt.b, alpha=h)
            self.K = K
        self._extra_done = False
        return z_new

    def error(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Local error estimate(s) Σ (b - b̂)_j k_j of the last step *without* the factor h: (N,)."""
        Ks = self._KT[self.s] if self.reuse else self.K[: self.s].T
        err = torch.mv(Ks, self.tt.b_err)
        err3 = None if self.tt.b_err3 is None else torch.mv(Ks, self.tt.b_err3)
        return err, err3

    def dense(self, vf, t: float, t_new: float, z: torch.Tensor, thetas: list[float]) -> torch.Tensor:
        """States at t + θ h for each θ in ``thetas`` (in [0, 1]) inside the last step: (n, N)."""
        h = t_new - t
        K = self.K
        if self.n_total > self.s and not self._extra_done:
            # extra stages of the continuous extension (DOP853), only in steps with outputs
            for j, (cj, row) in enumerate(zip(self.tab.extra_c, self.tt.extra_rows)):
                i = self.s + j
                zi = torch.addmv(z, K[:i].T, row, alpha=h)
                K[i] = vf(t + cj * h, zi.view(self.shape)).reshape(-1)
            self._extra_done = True
        th = np.asarray(thetas, dtype=float)[:, None]
        P = self.dense_poly
        W = np.zeros((len(thetas), P.shape[0]))
        for k in range(P.shape[1] - 1, -1, -1):  # Horner: b(θ) = θ(p1 + θ(p2 + ...))
            W = (W + P[:, k]) * th
        Wt = torch.as_tensor(W, dtype=self.dtype).to(self.device, non_blocking=True)
        return torch.addmm(z.unsqueeze(0), Wt, K, alpha=h)
