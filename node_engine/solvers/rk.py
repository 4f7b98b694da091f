"""The stepper: one explicit Runge–Kutta trial step, its error estimate and its dense output,
all read from the tableau (stages, FSAL, error weights, continuous extension and its extra stages).

Stage i is ``k_i = f(t + c_i h, z + h Σ_j a_ij k_j)``; the stages live in one (s, N) buffer, so
each stage combination is a single ``addmv`` (no Python sum over stages), and so are the new state
and the error estimate. Two step shapes, one code: a *shared* step (joint mode: z is (N,), h a
float, the buffer holds k_j and h enters as the gemv's alpha) and *per-row* steps (z is (B, D), h
a (B,) host array: the buffer holds h_b·k_j, so each combination is still one gemv over all rows). Without autograd the buffer, its slices and the stage-input buffers are
made once per solve (``addmv(..., out=)``), so a stage costs the field call plus two kernels.
The same code rebuilds a step's graph in the checkpoint adjoint (fresh buffers per step).
Dense output: ``y(t + θh) = y + h Σ_j b_j(θ) k_j`` with the polynomial weights ``b_j(θ)``
evaluated on the host by Horner's rule, then one ``addmm`` for all output times inside the step.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .rows import to_device
from .tableau import ButcherTableau

__all__ = ["RKStepper", "acquire_stepper", "release_stepper"]

# Reuse-mode steppers (stage buffer + its precomputed views) are pooled between solves: building
# them costs ~30 tensor views, a visible share of a small solve. A pooled stepper is taken out of
# the pool while in use, so nested or concurrent solves never share a buffer.
_POOL: dict[tuple, list["RKStepper"]] = {}
_POOL_LOCK = threading.Lock()  # the API solves for several models at once, from its threadpool
_POOL_MAX_BYTES = 64 * 2**20  # total size of the pooled stage buffers
_pool_bytes = 0


def _nbytes(st: "RKStepper") -> int:
    return (st.K.numel() + st.n) * st.K.element_size()  # stage buffer + stage input


def acquire_stepper(tab, work_shape, device, dtype) -> "RKStepper":
    """A reuse-mode (no autograd) stepper for this shape/device/dtype, from the pool if possible."""
    global _pool_bytes
    key = (tab.name, id(tab), tuple(work_shape), str(device), dtype)
    with _POOL_LOCK:
        free = _POOL.get(key)
        if free:
            st = free.pop()
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
    with _POOL_LOCK:
        while _pool_bytes + size > _POOL_MAX_BYTES and _POOL:
            old_key = next(iter(_POOL))
            for old in _POOL.pop(old_key, []):
                _pool_bytes -= _nbytes(old)
        free = _POOL.setdefault(key, [])
        if len(free) < 2:
            free.append(st)
            _pool_bytes += size


class RKStepper:
    """Runs steps of one tableau on flat states (device/dtype fixed per solve).

    Args:
        tab: the method.
        work_shape: the shape the field wrapper takes and returns: y's shape ((N,) for tuples) for a
            shared step; (B_active, D) with ``per_row`` (the field is a :class:`~.state.RowField`).
        reuse_buffer: keep one stage buffer for the whole solve (no autograd graph is built);
            False allocates a fresh buffer per step so autograd can record through it.
        per_row: every row has its own time and step (host float64 arrays of shape (B_active,)).
    """

    def __init__(self, tab: ButcherTableau, work_shape, device, dtype, *, reuse_buffer: bool,
                 per_row: bool = False):
        self.tab = tab
        self.s = tab.stages
        self.n_total = self.s + len(tab.extra_c)
        self.c = tab.c
        self.fsal = tab.fsal
        self.tt = tab.to(device, dtype)
        self.a_rows = self.tt.a_rows
        self._a21 = float(tab.a[1][0]) if self.s > 1 else 0.0
        self.device = device
        self.dtype = dtype
        self.reuse = reuse_buffer
        self.per_row = per_row
        self.dense_poly = None if tab.dense is None else np.array(tab.dense)  # (n_total, deg)
        # stage times of a per-row step: t + c h, with c = 1 stages at the step's end time
        self._c_all = np.array(tuple(tab.c) + tuple(tab.extra_c))[:, None]
        self._c_one = np.array([ci == 1.0 for ci in tab.c])
        self.K: torch.Tensor | None = None
        self._hcol = None
        self._f_last = None
        self._h = 0.0
        self._extra_done = False
        self.resize(work_shape)

    def resize(self, work_shape) -> None:
        """(Re)make the buffers for states of ``work_shape`` (per-row: after the active set shrank)."""
        self.shape = torch.Size(work_shape)
        self.n = self.shape.numel()
        if self.reuse:
            K = torch.empty(self.n_total, self.n, device=self.device, dtype=self.dtype)
            # one stage-input buffer for all stages: the field has consumed stage i's input (its
            # output is copied into K) before stage i+1's is written; a smaller working set keeps
            # the field's own data in cache on large states
            Y = torch.empty(self.n, device=self.device, dtype=self.dtype)
            self.K = K
            self._KT = [None] + [K[:i].T for i in range(1, self.n_total + 1)]  # (N, i) views
            self._rows = [K[i].view(self.shape) for i in range(self.n_total)]
            self._Yf = [Y] * self.s
            self._Ys = [Y.view(self.shape)] * self.s

    def set_k1(self, k1: torch.Tensor) -> None:
        """Shared-step reuse mode: put f(t, z) into the buffer's first row (kept across rejections)."""
        self._rows[0].copy_(k1)

    @property
    def last_stage(self) -> torch.Tensor:
        """The last stage k_s of the last step (= f(t_new, z_new) for FSAL methods), work shape."""
        if self.per_row:
            return self._f_last
        return self._rows[self.s - 1] if self.reuse else self.K[self.s - 1].view(self.shape)

    def _times(self, vf, t, h, t_end_eval, n_stages: int):
        """Per-row stage times (n_stages, B) as a tensor of the field's time dtype (one copy)."""
        ts = t + self._c_all[:n_stages] * h
        if n_stages <= self.s:
            ts[self._c_one[:n_stages]] = t_end_eval
        return to_device(ts, self.device, vf.t_dtype)

    def step(self, vf, t, t_new, t_end_eval, z: torch.Tensor, k1: torch.Tensor | None):
        """Trial step from (t, z) to t_new (floats, or (B,) host arrays per row). ``k1 = f(t, z)``
        in work shape; None in shared reuse mode means it is already in the buffer (``set_k1``).
        Stages with c = 1 are evaluated at ``t_end_eval`` (t_new, or just before a discontinuity).
        Returns z_new shaped like z, a new tensor.
        """
        h = t_new - t
        c, a, s = self.c, self.a_rows, self.s
        per_row = self.per_row
        if per_row:
            hcol = self._hcol = to_device(h, self.device, self.dtype).unsqueeze(1)
            ts = self._times(vf, t, h, t_end_eval, s)
            alpha = 1.0  # the buffer holds h·k
        else:
            self._h = alpha = h
        zf = z.view(-1) if per_row else z  # a shared step's state is flat already
        self._extra_done = False
        if self.reuse:
            KT, rows, Yf, Ys = self._KT, self._rows, self._Yf, self._Ys
            if per_row:
                torch.mul(k1, hcol, out=rows[0])
            elif k1 is not None:
                rows[0].copy_(k1)
            last = s - 1 if self.fsal else s
            for i in range(1, last):
                if i == 1:  # one previous stage: an axpy is 2-3x cheaper than a one-column gemv
                    torch.add(zf, self.K[0], alpha=alpha * self._a21, out=Yf[1])
                else:
                    torch.addmv(zf, KT[i], a[i], alpha=alpha, out=Yf[i])
                if per_row:
                    torch.mul(vf(ts[i], Ys[i]), hcol, out=rows[i])
                else:
                    ci = c[i]
                    rows[i].copy_(vf(t_end_eval if ci == 1.0 else t + ci * h, Ys[i]))
            if self.fsal:
                z_new = torch.addmv(zf, KT[s - 1], a[s - 1], alpha=alpha)
                if per_row:
                    self._f_last = vf(ts[s - 1], z_new.view(self.shape))
                    torch.mul(self._f_last, hcol, out=rows[s - 1])
                else:
                    rows[s - 1].copy_(vf(t_end_eval, z_new.view(self.shape)))
            else:
                z_new = torch.addmv(zf, KT[s], self.tt.b, alpha=alpha)
        else:
            K = torch.empty(self.n_total, self.n, device=self.device, dtype=self.dtype)
            K[0] = (k1 * hcol if per_row else k1).reshape(-1)
            zi = zf
            for i in range(1, s):
                if i == 1:  # as in reuse mode, so a solve's numbers do not depend on grad mode
                    zi = torch.add(zf, K[0], alpha=alpha * self._a21)
                else:
                    zi = torch.addmv(zf, K[:i].T, a[i], alpha=alpha)
                if per_row:
                    f = vf(ts[i], zi.view(self.shape))
                    self._f_last = f
                    K[i] = (f * hcol).reshape(-1)
                else:
                    ci = c[i]
                    K[i] = vf(t_end_eval if ci == 1.0 else t + ci * h, zi.view(self.shape)).reshape(-1)
            z_new = zi if self.fsal else torch.addmv(zf, K[:s].T, self.tt.b, alpha=alpha)
            self.K = K
        if not per_row:
            return z_new
        if not self.fsal:
            self._f_last = None
        return z_new.view(self.shape)

    def error(self) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Local error estimate(s) Σ (b - b̂)_j k_j of the last step, shaped like z, and the factor
        (|h| for a shared step, 1 per row: there the buffer holds h·k) its norm must be scaled by."""
        Ks = self._KT[self.s] if self.reuse else self.K[: self.s].T
        err = torch.mv(Ks, self.tt.b_err)
        err3 = None if self.tt.b_err3 is None else torch.mv(Ks, self.tt.b_err3)
        if not self.per_row:
            return err, err3, abs(self._h)
        return err.view(self.shape), (None if err3 is None else err3.view(self.shape)), 1.0

    def dense(self, vf, t, t_new, z: torch.Tensor, thetas, rows=None) -> torch.Tensor:
        """States at t + θ h inside the last step, for each θ in ``thetas`` (in [0, 1]): (M, *z.shape)
        for a shared step; per row: (M, D) for entries (``rows[m]``, ``thetas[m]``) (host arrays)."""
        K = self.K
        if self.n_total > self.s and not self._extra_done:
            # extra stages of the continuous extension (DOP853), only in steps with outputs
            h = t_new - t
            zf = z.view(-1)
            ts = self._times(vf, t, h, None, self.n_total) if self.per_row else None
            for j, (cj, row) in enumerate(zip(self.tab.extra_c, self.tt.extra_rows)):
                i = self.s + j
                if self.per_row:
                    zi = torch.addmv(zf, K[:i].T, row)
                    K[i] = (vf(ts[i], zi.view(self.shape)) * self._hcol).reshape(-1)
                else:
                    zi = torch.addmv(zf, K[:i].T, row, alpha=h)
                    K[i] = vf(t + cj * h, zi.view(self.shape)).reshape(-1)
            self._extra_done = True
        th = np.asarray(thetas, dtype=float)[:, None]
        P = self.dense_poly
        W = np.zeros((len(th), P.shape[0]))
        for k in range(P.shape[1] - 1, -1, -1):  # Horner: b(θ) = θ(p1 + θ(p2 + ...))
            W = (W + P[:, k]) * th
        Wt = torch.as_tensor(W, dtype=self.dtype).to(self.device, non_blocking=True)
        if not self.per_row:
            return torch.addmm(z.reshape(1, -1), Wt, K, alpha=t_new - t).view(-1, *z.shape)
        idx = to_device(rows, self.device)
        Ksel = K.view(self.n_total, *self.shape)[:, idx]  # (n_total, M, D)
        return torch.einsum("mj,jmd->md", Wt, Ksel) + z[idx]
