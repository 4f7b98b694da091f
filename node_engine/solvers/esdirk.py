"""Adaptive stiff solver: Kværnø's ESDIRK 5(4) (``method="kvaerno5"``), with error control.

Method: A. Kværnø, "Singly diagonally implicit Runge–Kutta methods with an explicit first stage",
BIT Numer. Math. 44 (2004) 489–502, the 7-stage pair of order 5 with an embedded order-4 solution
(γ = 0.26; the method diffrax calls ``Kvaerno5``). Both solutions are stiffly accurate (b and b̂ are
rows 7 and 6 of A, c₆ = c₇ = 1) and L-stable, so their difference, the error estimate, is damped
on stiff components. The coefficients are data below, checked at import by the rooted-tree order
conditions (order 5 for b, 4 for b̂) like every other tableau.

Each step: k₁ = f(t, y) (explicit stage); for i = 2..7 the stage value Yᵢ solves
``Yᵢ = y + h Σ_{j<i} a_ij k_j + h γ f(t + cᵢh, Yᵢ)`` by simplified Newton
(:func:`~.implicit.newton_solve`) with one Jacobian J = ∂f/∂y at (t, y) per step
(:func:`~.implicit.field_jacobian`: dense, for small states) and one LU of I − hγJ shared by all
six stages; then kᵢ = (Yᵢ − y − h Σ_{j<i} a_ij k_j)/(hγ) (Hairer–Wanner II §IV.8: not f(Yᵢ), which
would amplify the Newton residual by the stiffness). Newton stops when the weighted RMS of an update
(weights atol + rtol|Yᵢ|, the error norm's) is below ``newton_tol`` (default 0.01), or fails after
``newton_max_iters`` (default 10) or on divergence: the step is then *rejected* (its error is
NaN, so the controller retries it 10× smaller) rather than raising; the solve fails only when that
repeats (``SolveStatus.NON_FINITE`` after 12 in a row, the message names Newton). Step sizes: the
project's :class:`~.norms.ErrorNorm` and :class:`~.controller.PIController` (error order 4), through
the one adaptive loop (:func:`~.adaptive.integrate_adaptive`). Per-sample stepping
(:class:`ESDIRKRowStepper`): every row its own step, Jacobian (:func:`row_jacobians`, block
diagonal), Newton iteration and status, its steps landing on its own output times.

Dense output inside a step: cubic Hermite from (y, k₁) and (y_new, k₇) (order 3, as diffrax's
Kvaerno5). ``odeint`` does not use it for its outputs: it lands the steps on every output time,
because the interpolant cost up to 60× the tolerance on Robertson at rtol 1e-6 (the steps: < 3×).
Gradients: backprop through the solve works: after each stage converges, one Newton update is
replayed with autograd on and the Jacobian at the converged stage value (one more Jacobian per
stage, only when autograd records), which gives the implicit-function-theorem derivative of the
stage. ``odeint_adjoint``: the backsolve integrates the augmented [y, a, a_θ] system with this
method and a block-diagonal Newton matrix (:func:`adjoint_newton_factor`); the checkpoint adjoint
replays each step (exact gradient of the forward steps; the one to use on stiff problems, since
y integrated backwards grows the fast modes, see docs/torchdiffeq.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .implicit import field_jacobian, newton_solve
from .rows import to_device
from .tableau import rooted_tree_conditions

__all__ = ["ESDIRKTableau", "ESDIRKStepper", "ESDIRKRowStepper", "row_jacobians", "row_inverses",
           "adjoint_newton_factor", "KVAERNO5", "STIFF", "ESDIRK_NEWTON_TOL", "ESDIRK_NEWTON_MAX_ITERS"]

ESDIRK_NEWTON_TOL = 0.01  # weighted RMS of a Newton update, in units of the error tolerance
ESDIRK_NEWTON_MAX_ITERS = 10  # more means the step is too long for the Jacobian: reject, shrink


@dataclass(frozen=True)
class ESDIRKTableau:
    """An ESDIRK pair: strictly lower ``a_lower`` (row i: a_i1..a_i,i-1, i = 2..s), diagonal γ,
    solution weights = last row of A, embedded weights = row s−1 (both stiffly accurate)."""

    name: str
    gamma: float
    a_lower: tuple[tuple[float, ...], ...]
    order: int
    error_order: int
    reference: str

    adaptive = True  # read by the solve: error control with an ErrorNorm and a PIController
    fsal = False

    @property
    def stages(self) -> int:
        return len(self.a_lower) + 1

    @property
    def control_order(self) -> int:
        return self.error_order

    def full_a(self) -> np.ndarray:
        s = self.stages
        A = np.zeros((s, s))
        for i, row in enumerate(self.a_lower, start=1):
            A[i, :i] = row
            A[i, i] = self.gamma
        return A

    @property
    def c(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.full_a().sum(1))

    def __post_init__(self) -> None:
        A = self.full_a()
        if any(len(row) != i for i, row in enumerate(self.a_lower, start=1)):
            raise ValueError(f"{self.name}: row i of a_lower needs i-1 entries")
        c = A.sum(1)
        if abs(c[-1] - 1) > 1e-12 or abs(c[-2] - 1) > 1e-12:
            raise ValueError(f"{self.name}: the last two stages must be at c = 1 (stiffly accurate pair)")
        phi, rho, gam = rooted_tree_conditions(A, self.order)
        for w, p, what in ((A[-1], self.order, "b"), (A[-2], self.error_order, "embedded b̂")):
            mask = rho <= p
            resid = phi[mask] @ w - 1.0 / gam[mask]
            if np.max(np.abs(resid)) > 1e-12:
                raise ValueError(f"{self.name}: {what} violates an order-{int(rho[mask][np.abs(resid) > 1e-12].min())}"
                                 f" condition (claimed order {p})")


# Kværnø (2004), ESDIRK 5(4), 7 stages, γ = 0.26 (c = 0, 0.52, 1.2303..., 0.8958..., 0.4364..., 1, 1)
KVAERNO5 = ESDIRKTableau(
    "kvaerno5", 0.26,
    ((0.26,),
     (0.13, 0.84033320996790809),
     (0.22371961478320505, 0.47675532319799699, -0.06470895363112615),
     (0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998),
     (0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676),
     (0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046, 0.62993304899016403,
      0.06962479448202728)),
    order=5, error_order=4,
    reference="A. Kværnø, BIT Numer. Math. 44 (2004) 489–502, ESDIRK 5(4), 7 stages",
)

STIFF: dict[str, ESDIRKTableau] = {KVAERNO5.name: KVAERNO5}


def _setup_newton(st, tab, device, dtype, rtol, atol, newton_tol, newton_max_iters):
    """The Newton settings and stage matrix both ESDIRK steppers share; returns ``tab.full_a()``.

    Raises:
        ValueError: newton_tol <= 0 or newton_max_iters < 0.
    """
    st.rtol, st.atol = rtol, atol
    st.newton_tol = ESDIRK_NEWTON_TOL if newton_tol is None else float(newton_tol)
    st.newton_max_iters = ESDIRK_NEWTON_MAX_ITERS if newton_max_iters is None else int(newton_max_iters)
    if not (st.newton_tol > 0 and st.newton_max_iters >= 0):
        raise ValueError(f"options['newton_tol'] must be > 0 and options['newton_max_iters'] >= 0, got "
                         f"{st.newton_tol}, {st.newton_max_iters}")
    A = tab.full_a()
    st.A = torch.tensor(A, dtype=dtype, device=device)
    st.gamma = tab.gamma
    return A


class ESDIRKStepper:
    """Trial steps of an :class:`ESDIRKTableau` with the interface of :class:`~.rk.RKStepper` that
    :func:`~.adaptive.integrate_adaptive` uses in joint mode (``step``, ``error``, ``dense``).

    Args:
        work_shape: the field's state shape; rtol, atol: the solve's tolerances (floats or (N,)
            tensors), which weight the Newton convergence test; newton_tol, newton_max_iters: above.
    """

    per_row = False
    reuse = False
    fsal = False

    def __init__(self, tab: ESDIRKTableau, work_shape, device, dtype, rtol, atol, *,
                 newton_tol: float | None = None, newton_max_iters: int | None = None):
        self.tab = tab
        self.shape = torch.Size(work_shape)
        self.n = self.shape.numel()
        self.device, self.dtype = device, dtype
        A = _setup_newton(self, tab, device, dtype, rtol, atol, newton_tol, newton_max_iters)
        self.c = tab.c
        self.b_err = torch.tensor(A[-1] - A[-2], dtype=dtype, device=device)
        self.newton_failures = 0  # steps rejected because a stage's Newton solve failed
        self.failure_note = ""  # the last Newton failure, for the solve's error message
        self._K = None
        self._h = 0.0
        self._z_new = None

    def _weights(self, y: torch.Tensor) -> torch.Tensor:
        # the error norm's weights, floored so that the test never asks for an update below
        # 100 eps |y| (float32 at rtol 1e-7 would otherwise never converge)
        a = y.abs()
        floor = a * (100 * torch.finfo(self.dtype).eps / self.newton_tol)
        return torch.maximum(torch.add(torch.mul(a, self.rtol), self.atol), floor)

    def step(self, vf, t, t_new, t_end_eval, z: torch.Tensor, k1: torch.Tensor):
        """z_new (N,) of the trial step from (t, z) (z: (N,)) to t_new; ``k1 = f(t, z)``. A failed
        Newton solve returns NaN (the step's error is then NaN: rejected, retried smaller)."""
        h = t_new - t
        self._h = h
        s, n, hg = self.tab.stages, self.n, h * self.gamma
        zf = z.reshape(-1)
        K = [k1.reshape(-1)]
        factor = getattr(vf, "newton_factor", None)  # a field may supply its own Newton matrix (the adjoint's)
        if factor is not None:
            lu = factor(t, zf, hg)
        else:
            J = field_jacobian(vf, t, zf, self.shape)
            lu = torch.linalg.lu_factor(torch.eye(n, dtype=self.dtype, device=self.device) - hg * J)
        grad = torch.is_grad_enabled()
        for i in range(1, s):
            ti = t_end_eval if self.c[i] == 1.0 else t + self.c[i] * h
            base = zf + h * (self.A[i, :i] @ torch.stack(K))  # (N,)
            based = base.detach()
            w = self._weights(based)

            def residual(Y, ti=ti, based=based):
                return Y - based - hg * vf(ti, Y.view(self.shape)).reshape(-1)

            Y, ok, it, change = newton_solve(
                residual, lu, based + hg * K[-1].detach(),
                lambda dY, w=w: float(torch.linalg.vector_norm(dY / w)) / math.sqrt(n),
                self.newton_tol, self.newton_max_iters, stop_diverging=True)
            if not ok:
                self.newton_failures += 1
                self.failure_note = (f"; {self.tab.name}'s Newton solve of stage {i + 1} did not converge at t={t:g} "
                                     f"(h={h:.3g}, last weighted update {change:.3g} > newton_tol {self.newton_tol:g}"
                                     f" after {it} iterations)")
                self._K = None
                return torch.full_like(zf, math.nan)
            if grad:
                # one Newton update with autograd on, with the Jacobian at the converged Y (the step's
                # J gave 6% gradient errors on y' = -k y²): the implicit-function-theorem derivative
                lu_y = torch.linalg.lu_factor(torch.eye(n, dtype=self.dtype, device=self.device)
                                              - hg * field_jacobian(vf, ti, Y, self.shape))
                Y = Y - torch.linalg.lu_solve(*lu_y, (Y - base - hg * vf(ti, Y.view(self.shape)).reshape(-1))
                                              .reshape(-1, 1)).view(-1)
            K.append((Y - base) / hg)
        self._K = torch.stack(K)  # (s, N)
        self._z_new = Y  # stiffly accurate: the last stage value is the solution
        return Y

    def error(self) -> tuple[torch.Tensor, None, float]:
        """Σ (b − b̂)_j k_j of the last step (NaN after a Newton failure) and the factor |h|."""
        if self._K is None:
            return torch.full((self.n,), math.nan, dtype=self.dtype, device=self.device), None, abs(self._h)
        return torch.mv(self._K.detach().T, self.b_err), None, abs(self._h)

    def dense(self, vf, t, t_new, z: torch.Tensor, thetas, rows=None) -> torch.Tensor:
        """(M, *z.shape): cubic Hermite interpolation of the last accepted step at t + θh."""
        h = t_new - t
        th = torch.as_tensor(np.asarray(thetas, dtype=float), dtype=self.dtype, device=self.device)[:, None]
        y0, y1 = z.reshape(1, -1), self._z_new.reshape(1, -1)
        f0, f1 = self._K[0].reshape(1, -1), self._K[-1].reshape(1, -1)
        h00 = (1 + 2 * th) * (1 - th) ** 2
        h10 = th * (1 - th) ** 2
        h01 = th**2 * (3 - 2 * th)
        h11 = th**2 * (th - 1)
        return (h00 * y0 + h10 * h * f0 + h01 * y1 + h11 * h * f1).view(-1, *z.shape)


def row_jacobians(vf, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-row Jacobians (B, D, D), ``J[b] = ∂f_b/∂z_b``, of a row field at (t, z), detached.

    ``vf``: a :class:`~.state.RowField` (t: (B,) tensor of each row's time; z: (B, D)). Rows must
    be independent (what per-sample stepping requires of ``func``), so column j of every row's
    Jacobian is one vector–Jacobian product of the field's column j summed over rows: one field
    call (counted in NFE) and D products, whatever B. NaN/inf entries become finite (a bad Jacobian
    shows up as a failed Newton solve).
    """
    B, D = z.shape
    with torch.enable_grad():
        zj = z.detach().requires_grad_(True)
        f = vf(t, zj)
        if not f.requires_grad:
            return torch.zeros(B, D, D, dtype=z.dtype, device=z.device)
        cols = []
        for j in range(D):
            e = torch.zeros_like(f)
            e[:, j] = 1.0
            g = torch.autograd.grad(f, zj, e, retain_graph=j < D - 1, allow_unused=True)[0]
            cols.append(torch.zeros_like(z) if g is None else g)
    return torch.nan_to_num(torch.stack(cols, 1).detach())  # (B, D, D): [b, j, :] = ∂f_bj/∂z_b


#: per-row Newton matrices up to this size are inverted by vectorised Gauss–Jordan (elementwise kernels):
#: CPU batched LAPACK (lu_factor/lu_solve/inv of (B, D, D)) parallelises over the batch and cost ~25 ms a
#: call for B = 3, D = 2 on a busy 2-core machine (5 µs on one thread); larger blocks use torch.linalg.inv
SMALL_BLOCK = 16


def row_inverses(M: torch.Tensor) -> torch.Tensor:
    """Inverses (B, D, D) of the row blocks M (B, D, D): Gauss–Jordan elimination with partial
    pivoting vectorised over rows for D <= ``SMALL_BLOCK``, else ``torch.linalg.inv``. A singular
    block gives inf/NaN entries (its Newton update is then non-finite: the row's step is rejected)."""
    B, D, _ = M.shape
    if D > SMALL_BLOCK:
        return torch.linalg.inv_ex(M)[0]
    A = torch.cat([M, torch.eye(D, dtype=M.dtype, device=M.device).expand(B, D, D)], -1)  # (B, D, 2D)
    rows = torch.arange(B, device=M.device)
    for k in range(D):
        p = A[:, k:, k].abs().argmax(1) + k  # pivot row of each block
        top, piv = A[rows, k], A[rows, p]
        A = A.index_put((rows, p), top).index_put((rows, torch.full_like(p, k)), piv)
        pivot_row = A[:, k] / A[:, k, k:k + 1]  # (B, 2D)
        f = A[:, :, k].clone()
        f[:, k] = 0.0
        A = A - f.unsqueeze(-1) * pivot_row.unsqueeze(1)
        A[:, k] = pivot_row
    return A[:, :, D:]


def _apply(Minv: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Minv[b] @ v[b] for every row (elementwise kernels: see SMALL_BLOCK)."""
    return (Minv * v.unsqueeze(1)).sum(-1)


class ESDIRKRowStepper:
    """Per-sample trial steps of an :class:`ESDIRKTableau` (``step_control="per_sample"``): the
    interface of a per-row :class:`~.rk.RKStepper` that :func:`~.adaptive.integrate_adaptive` uses
    (``step``, ``error``, ``dense``, ``resize``), with the loop's rows, compaction, controller and
    norm unchanged.

    Every row b has its own step h_b, its own Jacobian J_b = ∂f_b/∂z_b (:func:`row_jacobians`:
    the batch's Newton matrix is block diagonal) and its own inverse of I − h_b γ J_b (:func:`row_inverses`, once per
    step), and its own Newton iteration: a row whose update passes the test stops
    (it is frozen, so its stage value is the one it would get alone), a row that fails (no
    convergence, divergence, NaN) gets a NaN step (its error is NaN: rejected, retried 10× smaller,
    as in the joint stepper) while the others go on; only the rows still iterating are evaluated.
    A row's result therefore does not depend on its batch-mates (up to round-off of the field's
    batched kernels). Gradients: as the joint stepper, one Newton update per stage replayed under
    autograd with the Jacobians at the converged stage values.

    Args:
        work_shape: (B, D) active rows; rtol, atol: floats or (D,) tensors (the Newton weights);
            newton_tol, newton_max_iters: as :class:`ESDIRKStepper`.
    """

    per_row = True
    reuse = False
    fsal = False

    def __init__(self, tab: ESDIRKTableau, work_shape, device, dtype, rtol, atol, *,
                 newton_tol: float | None = None, newton_max_iters: int | None = None):
        self.tab = tab
        self.device, self.dtype = device, dtype
        A = _setup_newton(self, tab, device, dtype, rtol, atol, newton_tol, newton_max_iters)
        self._c = np.array(tab.c)[:, None]  # (s, 1)
        self._c_one = np.array([ci == 1.0 for ci in tab.c])
        self.b_err = torch.tensor(A[-1] - A[-2], dtype=dtype, device=device)
        self.newton_failures = 0  # row steps rejected because a stage's Newton solve failed
        self.failure_note = ""
        self._K = self._hcol = self._ok = self._z_new = None
        self.resize(work_shape)

    def resize(self, work_shape) -> None:
        """The active set changed (compaction): states are now ``work_shape`` (B_active, D)."""
        self.shape = torch.Size(work_shape)

    _weights = ESDIRKStepper._weights

    def _newton(self, vf, ti: torch.Tensor, based, hg, lu, x, w, todo: np.ndarray):
        """Simplified Newton per row on ``Y − based − hg f(ti, Y) = 0`` for the rows in ``todo``
        (bool (B,)); returns (Y (B, D), converged (B,) bool, last weighted update (B,))."""
        B, D = x.shape
        conv = np.zeros(B, dtype=bool)
        change = np.full(B, math.nan)
        prev = np.full(B, math.inf)
        todo = todo.copy()
        with torch.no_grad(), np.errstate(invalid="ignore"):
            x = x.clone()
            for it in range(1, self.newton_max_iters + 2):
                rows = np.flatnonzero(todo)
                if rows.size == 0:
                    break
                if rows.size < B:  # only the rows still iterating: converged ones are frozen
                    idx = to_device(rows, x.device)
                    xs, bs, hs, ws, ts, Ms = x[idx], based[idx], hg[idx], w[idx], ti[idx], lu[idx]
                else:
                    xs, bs, hs, ws, ts, Ms = x, based, hg, w, ti, lu
                r = xs - bs - hs * vf(ts, xs)
                dx = -_apply(Ms, r)
                xs = xs + dx
                c = torch.linalg.vector_norm(dx / ws, dim=-1).cpu().double().numpy() / math.sqrt(D)
                if rows.size < B:
                    x.index_copy_(0, idx, xs)
                else:
                    x = xs
                change[rows] = c
                good = c <= self.newton_tol
                bad = ~np.isfinite(c) | ((it > 2) & (c > 2 * prev[rows]))
                conv[rows[good]] = True
                todo[rows[good | bad]] = False
                prev[rows] = c
        return x, conv, change

    def step(self, vf, t, t_new, t_end_eval, z: torch.Tensor, k1: torch.Tensor):
        """z_new (B, D) of every row's trial step from (t_b, z_b) to t_new_b (host (B,) arrays);
        ``k1 = f(t, z)`` (B, D). Rows whose Newton solve failed are NaN (rejected by the loop)."""
        B, D = z.shape
        h = t_new - t
        s = self.tab.stages
        hcol = self._hcol = to_device(h, self.device, self.dtype).unsqueeze(1)  # (B, 1)
        hg = hcol * self.gamma
        th = t + self._c * h  # (s, B) stage times; c = 1 stages at t_end_eval
        th[self._c_one] = t_end_eval
        ts = to_device(th, self.device, vf.t_dtype)
        eye = torch.eye(D, dtype=self.dtype, device=self.device)
        J = row_jacobians(vf, ts[0], z)
        lu = row_inverses(eye - hg.unsqueeze(-1) * J)  # (B, D, D): each row's Newton matrix, inverted
        grad = torch.is_grad_enabled()
        ok = np.ones(B, dtype=bool)
        K = [k1]
        for i in range(1, s):
            base = z + hcol * torch.einsum("j,jbd->bd", self.A[i, :i], torch.stack(K))
            based = base.detach()
            Y, conv, change = self._newton(vf, ts[i], based, hg, lu, based + hg * K[-1].detach(),
                                           self._weights(based), ok)
            failed = ok & ~conv
            if failed.any():
                self.newton_failures += int(failed.sum())
                r = int(np.flatnonzero(failed)[0])
                self.failure_note = (f"; {self.tab.name}'s Newton solve of stage {i + 1} did not converge at "
                                     f"t={float(t[r]):g} (h={float(h[r]):.3g}, last weighted update "
                                     f"{float(change[r]):.3g} > newton_tol {self.newton_tol:g})")
                ok &= conv
            if grad:
                # one Newton update with autograd on, with each row's Jacobian at its converged Y (the
                # implicit-function-theorem derivative); failed rows replay from a finite stand-in
                okc = to_device(ok, self.device).unsqueeze(1)
                Y = torch.where(okc, Y, based)
                Minv = row_inverses(eye - hg.unsqueeze(-1) * row_jacobians(vf, ts[i], Y))
                Y = Y - _apply(Minv, Y - base - hg * vf(ts[i], Y))
            K.append((Y - base) / hg)
        self._K = torch.stack(K)  # (s, B, D)
        self._ok = ok
        z_new = Y
        if not ok.all():
            z_new = torch.where(to_device(ok, self.device).unsqueeze(1), Y, math.nan)
        self._z_new = z_new
        return z_new

    def error(self) -> tuple[torch.Tensor, None, float]:
        """h_b Σ (b − b̂)_j k_j per row (B, D) of the last step (NaN rows: failed Newton) and the factor 1."""
        err = self._hcol * torch.einsum("j,jbd->bd", self.b_err, self._K.detach())
        if not self._ok.all():
            err = torch.where(to_device(self._ok, self.device).unsqueeze(1), err, math.nan)
        return err, None, 1.0

    def dense(self, vf, t, t_new, z: torch.Tensor, thetas, rows=None) -> torch.Tensor:
        """(M, D): cubic Hermite interpolation at (``rows[m]``, ``thetas[m]``) of the last step (the
        solve lands on every output time, so this serves only callers that ask between steps)."""
        idx = to_device(np.asarray(rows), self.device)
        th = torch.as_tensor(np.asarray(thetas, dtype=float), dtype=self.dtype, device=self.device)[:, None]
        hh = self._hcol[idx]
        y0, y1 = z[idx], self._z_new[idx]
        f0, f1 = self._K[0][idx], self._K[-1][idx]
        return ((1 + 2 * th) * (1 - th) ** 2 * y0 + th * (1 - th) ** 2 * hh * f0 + th**2 * (3 - 2 * th) * y1
                + th**2 * (th - 1) * hh * f1)


def adjoint_newton_factor(vf, n: int, t: float, z: torch.Tensor, hg: float):
    """The simplified Newton solve of the backsolve adjoint's augmented system [y, a, a_θ] (flat,
    2N + P) for an ESDIRK stage with h γ = ``hg``: a callable rhs (2N + P, 1) -> solution.

    The exact Jacobian of [f, −aᵀ∂f/∂y, −aᵀ∂f/∂θ] is block lower triangular,
    [[J, 0, 0], [∗, −Jᵀ, 0], [∗, ∗, 0]] with J = ∂f/∂y at the stage's start; the Newton matrix only
    sets how fast Newton converges, not what it converges to, so the ∗ blocks (second derivatives
    of f) are dropped: I − hγ·diag(J, −Jᵀ, 0) is solved as two N×N LUs (of I − hγJ and I + hγJᵀ)
    and the identity on a_θ. One field call and N vector–Jacobian products of ``vf`` (the forward
    field, :func:`~.implicit.field_jacobian`), whatever the number P of parameters.
    """
    J = field_jacobian(vf, t, z[:n], vf.work_shape)
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    lu_y = torch.linalg.lu_factor(eye - hg * J)
    lu_a = torch.linalg.lu_factor(eye + hg * J.T)

    def solve(rhs: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.linalg.lu_solve(*lu_y, rhs[:n]), torch.linalg.lu_solve(*lu_a, rhs[n:2 * n]),
                          rhs[2 * n:]])

    return solve
