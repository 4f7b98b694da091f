"""Implicit Runge–Kutta methods on a fixed grid, under torchdiffeq's names, with a Newton solve.

Tableaus (full A, validated at import by the same rooted-tree order conditions as the explicit ones):
implicit_euler (order 1), implicit_midpoint (2), trapezoid (2; Crank–Nicolson), radauIIA3 (3),
radauIIA5 (5), gl4 (4), gl6 (6) (Gauss–Legendre; HNW II §IV.5, Tables 5.1, 5.5, 5.6), sdirk2 (2;
Alexander 1977, γ = 1 − 1/√2), trbdf2 (2; Bank et al. 1985 as an ESDIRK, HNW II §IV.6).

Each step solves the stage equations G(K) = K − f(t + c h, y + h (A⊗I) K) = 0 by simplified Newton:
the Jacobian J = ∂f/∂y at the step's start (one dense N×N Jacobian per step, by autograd: meant for
small states), the matrix I − h A⊗J factorised once, iterations until the largest stage update
times |h| is below ``newton_tol`` (default 100·eps of the dtype, relative to max(1, |y|)); no
convergence in ``newton_max_iters`` (default 50) raises
:class:`~node_engine.errors.NewtonConvergenceError`. Stages whose A row is zero (c = 0: trapezoid,
trbdf2) are f(t, y) itself. Gradients (backprop through ``odeint``): the converged stages K*
are differentiated by the implicit function theorem with the exact stage Jacobian I − ∂F/∂K at
K* (each stage's own ∂f/∂y at its converged value; one dense linear solve per step in the
backward pass, see ``ImplicitStepper._ift_stages``), so the gradient is that of the discrete
solve up to the Newton tolerance; the forward values do not depend on whether autograd records.
The adjoint's backsolve steps the augmented system like any other field.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import NewtonConvergenceError
from .tableau import rooted_tree_conditions

__all__ = ["ImplicitTableau", "ImplicitStepper", "IMPLICIT_TABLEAUS", "NEWTON_MAX_ITERS", "newton_tol",
           "field_jacobian", "newton_solve"]

NEWTON_MAX_ITERS = 50


def newton_tol(dtype: torch.dtype) -> float:
    """Default Newton tolerance: 100 machine epsilons of the state's dtype."""
    return 100 * torch.finfo(dtype).eps


def field_jacobian(vf, t, zf: torch.Tensor, shape) -> torch.Tensor:
    """Dense Jacobian ∂f/∂y (N, N) of the flattened field at (t, zf) (zf: (N,)), detached.

    One field call (counted in NFE) and N vector–Jacobian products: meant for small states. A
    component the field does not depend on gives a zero row; NaN/inf entries become finite
    (a bad Jacobian shows up as a failed Newton solve, not as a crash here).
    """
    n = zf.numel()
    with torch.enable_grad():
        zj = zf.detach().requires_grad_(True)
        fj = vf(t, zj.view(shape)).reshape(-1)
        eye = torch.eye(n, dtype=zf.dtype, device=zf.device)
        J = torch.stack([torch.autograd.grad(fj, zj, e, retain_graph=True, allow_unused=True)[0]
                         if fj.requires_grad else torch.zeros(n, dtype=zf.dtype, device=zf.device)
                         for e in eye])
    return torch.nan_to_num(J.detach()) if J.numel() else J.detach()


def newton_solve(residual, lu, x: torch.Tensor, size, tol: float, max_iters: int, *, stop_diverging: bool = False):
    """Simplified Newton: ``x += lu_solve(lu, -residual(x))`` until ``size(dx) <= tol``.

    Args:
        residual: x -> G(x), x's shape; lu: ``torch.linalg.lu_factor`` of (an approximation of) ∂G/∂x
            over the flattened x, reused by every iteration (one factorisation per step), or a
            callable rhs (n, 1) -> solution (n, 1) of such a system (a structured solve);
        size: dx -> float (the caller's convergence measure); tol: its threshold.
    Returns:
        (x, converged, iterations, last size). Runs without autograd; the caller raises its own
        :class:`~node_engine.errors.NewtonConvergenceError` (or rejects the step) when not converged.
        A NaN/inf update stops early; so does, with ``stop_diverging``, an update more than twice the
        previous one after the second iteration (an adaptive caller then retries a smaller step).
    """
    change, prev = math.inf, math.inf
    solve = lu if callable(lu) else functools.partial(torch.linalg.lu_solve, *lu)  # callable: the caller's solver
    with torch.no_grad():
        x = x.clone()
        for it in range(1, max_iters + 2):
            dx = solve(-residual(x).reshape(-1, 1)).view(x.shape)
            x += dx
            change = size(dx)
            if not math.isfinite(change):
                return x, False, it, change
            if change <= tol:
                return x, True, it, change
            if stop_diverging and it > 2 and change > 2 * prev:
                return x, False, it, change
            prev = change
    return x, False, max_iters + 1, change


@dataclass(frozen=True)
class ImplicitTableau:
    """An implicit Runge–Kutta method: full (s, s) ``a``, weights ``b``, nodes ``c``, claimed order."""

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    reference: str
    adaptive: bool = field(default=False, init=False)
    fsal: bool = field(default=False, init=False)
    stages: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        s = len(self.c)
        A = np.array(self.a, dtype=float)
        if A.shape != (s, s) or len(self.b) != s:
            raise ValueError(f"{self.name}: a must be {s}x{s} and b have {s} entries")
        if np.max(np.abs(A.sum(1) - np.array(self.c))) > 1e-12:
            raise ValueError(f"{self.name}: rows of a must sum to c")
        phi, rho, gamma = rooted_tree_conditions(A, self.order)
        resid = phi @ np.array(self.b) - 1.0 / gamma
        if np.max(np.abs(resid)) > 1e-10:
            raise ValueError(f"{self.name}: b violates an order-{int(rho[np.abs(resid) > 1e-10].min())} condition "
                             f"(claimed order {self.order})")
        object.__setattr__(self, "stages", s)


class ImplicitStepper:
    """Steps of an :class:`ImplicitTableau` with the interface ``integrate_fixed`` uses."""

    def __init__(self, tab: ImplicitTableau, work_shape, device, dtype, *, tol: float | None = None,
                 max_iters: int = NEWTON_MAX_ITERS):
        self.tab, self.shape, self.device, self.dtype = tab, torch.Size(work_shape), device, dtype
        self.n = self.shape.numel()
        self.fsal = False
        self.per_row = False
        self.tol = newton_tol(dtype) if tol is None else float(tol)
        self.max_iters = int(max_iters)
        self.A = torch.tensor(tab.a, dtype=dtype, device=device)
        self.b = torch.tensor(tab.b, dtype=dtype, device=device)
        self.explicit = [all(x == 0 for x in row) for row in tab.a]

    def _stage_f(self, vf, ts, z, K, h, f0):
        Y = z.reshape(1, -1) + h * (self.A @ K)  # (s, N)
        return torch.stack([f0 if self.explicit[i] else vf(ts[i], Y[i].view(self.shape)).reshape(-1)
                            for i in range(len(ts))])

    def step(self, vf, t, t_new, t_end_eval, z: torch.Tensor, k1: torch.Tensor | None):
        """z_new (N,) after one step from (t, z) to t_new; ``k1 = f(t, z)`` (the explicit stages
        and the initial guess of the others)."""
        tab, s, N = self.tab, self.tab.stages, self.n
        h = t_new - t
        ts = [t_end_eval if ci == 1.0 else t + ci * h for ci in tab.c]
        zf = z.reshape(-1)
        f0 = k1.reshape(-1)
        t_jac = ts[self.explicit.index(False)]  # inside the step (perturb: never on a grid point)
        J = field_jacobian(vf, t_jac, zf, self.shape)
        M = torch.eye(s * N, dtype=self.dtype, device=self.device) - h * torch.kron(self.A, J)
        lu = torch.linalg.lu_factor(M)
        scale = self.tol * max(1.0, float(zf.detach().abs().max()))
        zd, f0d = zf.detach(), f0.detach()
        K, ok, it, change = newton_solve(lambda K: K - self._stage_f(vf, ts, zd, K, h, f0d), lu,
                                         f0d.expand(s, N), lambda dK: float(dK.abs().max()) * abs(h), scale,
                                         self.max_iters)
        if not ok:
            raise NewtonConvergenceError(
                f"{tab.name}: the Newton solve of the stage equations did not converge at t={t:g} (h={h:.3g}; last "
                f"update {change:.3g} > newton_tol {scale:.3g} after {it} iterations); use a smaller step_size",
                t=t)
        if torch.is_grad_enabled():
            K = self._ift_stages(vf, ts, zf, K, h, f0)
        return zf + h * (self.b @ K)

    def _ift_stages(self, vf, ts, zf, K, h, f0):
        """The converged stages K* (values unchanged) carrying the implicit-function-theorem derivative.

        With F(K; z, θ) the stage map (K = F(K) at convergence), dK* = (I − ∂F/∂K)⁻¹ (∂F/∂z dz + ∂F/∂θ dθ),
        where block (i, j) of ∂F/∂K is h a_ij J_i, J_i = ∂f/∂y at stage i's converged value (not the
        Newton iteration's step-start J). Forward: F evaluated once at K* under autograd; backward: a
        hook on it replaces the incoming gradient g by (I − ∂F/∂K)⁻ᵀ g (one dense (sN × sN) solve,
        with the stage Jacobians computed then, N vector–Jacobian products each), and autograd takes
        it through ∂F/∂(z, θ). Exact up to the Newton tolerance, on nonlinear fields too.
        """
        Ks = K.detach()
        F = self._stage_f(vf, ts, zf, Ks, h, f0)
        if not F.requires_grad:
            return Ks
        s, N = Ks.shape
        A, explicit, shape = self.A, self.explicit, self.shape

        def adjoint_solve(g):
            Y = zf.detach().reshape(1, -1) + h * (A @ Ks)
            Js = torch.stack([torch.zeros(N, N, dtype=Ks.dtype, device=Ks.device) if explicit[i]
                              else field_jacobian(vf, ts[i], Y[i], shape) for i in range(s)])
            dFdK = (h * A[:, :, None, None] * Js[:, None]).permute(0, 2, 1, 3).reshape(s * N, s * N)
            M = torch.eye(s * N, dtype=Ks.dtype, device=Ks.device) - dFdK
            return torch.linalg.solve(M.mT, g.reshape(-1, 1).to(M.dtype)).view_as(g).to(g.dtype)

        F.register_hook(adjoint_solve)
        return F + (Ks - F).detach()


_S2, _S3, _S6, _S15 = math.sqrt(2), math.sqrt(3), math.sqrt(6), math.sqrt(15)
_G = 1 - _S2 / 2  # sdirk2 / trbdf2 γ
_BT = _S2 / 4

IMPLICIT_TABLEAUS = (
    ImplicitTableau("implicit_euler", (1.0,), ((1.0,),), (1.0,), 1, "backward Euler; HNW II §IV.3"),
    ImplicitTableau("implicit_midpoint", (0.5,), ((0.5,),), (1.0,), 2, "implicit midpoint rule; HNW II §IV.3"),
    ImplicitTableau("trapezoid", (0.0, 1.0), ((0.0, 0.0), (0.5, 0.5)), (0.5, 0.5), 2,
                    "trapezoidal rule (Crank–Nicolson); HNW II §IV.3"),
    ImplicitTableau("radauIIA3", (1 / 3, 1.0), ((5 / 12, -1 / 12), (3 / 4, 1 / 4)), (3 / 4, 1 / 4), 3,
                    "Radau IIA, s = 2; HNW II Table 5.5"),
    ImplicitTableau("radauIIA5", (0.4 - _S6 / 10, 0.4 + _S6 / 10, 1.0),
                    ((11 / 45 - 7 * _S6 / 360, 37 / 225 - 169 * _S6 / 1800, -2 / 225 + _S6 / 75),
                     (37 / 225 + 169 * _S6 / 1800, 11 / 45 + 7 * _S6 / 360, -2 / 225 - _S6 / 75),
                     (4 / 9 - _S6 / 36, 4 / 9 + _S6 / 36, 1 / 9)),
                    (4 / 9 - _S6 / 36, 4 / 9 + _S6 / 36, 1 / 9), 5, "Radau IIA, s = 3; HNW II Table 5.6"),
    ImplicitTableau("gl4", (0.5 - _S3 / 6, 0.5 + _S3 / 6), ((0.25, 0.25 - _S3 / 6), (0.25 + _S3 / 6, 0.25)),
                    (0.5, 0.5), 4, "Gauss–Legendre, s = 2; HNW II Table 5.1"),
    ImplicitTableau("gl6", (0.5 - _S15 / 10, 0.5, 0.5 + _S15 / 10),
                    ((5 / 36, 2 / 9 - _S15 / 15, 5 / 36 - _S15 / 30),
                     (5 / 36 + _S15 / 24, 2 / 9, 5 / 36 - _S15 / 24),
                     (5 / 36 + _S15 / 30, 2 / 9 + _S15 / 15, 5 / 36)),
                    (5 / 18, 4 / 9, 5 / 18), 6, "Gauss–Legendre, s = 3; HNW II Table 5.1"),
    ImplicitTableau("sdirk2", (_G, 1.0), ((_G, 0.0), (1 - _G, _G)), (1 - _G, _G), 2,
                    "Alexander, SIAM J. Numer. Anal. 14 (1977), γ = 1 − 1/√2"),
    ImplicitTableau("trbdf2", (0.0, 2 * _G, 1.0), ((0.0, 0.0, 0.0), (_G, _G, 0.0), (_BT, _BT, _G)), (_BT, _BT, _G), 2,
                    "TR-BDF2 (Bank et al., IEEE Trans. CAD 4, 1985) as an ESDIRK; HNW II §IV.6"),
)
