"""Butcher tableaus as validated, immutable data, and their per-solve tensor form.

A :class:`ButcherTableau` checks itself when built: row sums of ``a`` equal ``c``, the weights
``b`` satisfy every order condition up to ``order``, the embedded weights ``b - b_err`` up to
``error_order``, and the continuous extension ``b(θ)`` (dense output) up to ``dense_order`` at
several θ. The order conditions are generated from rooted trees (Butcher 1963; Hairer, Nørsett,
Wanner, *Solving ODEs I*, §II.2), so a mistyped coefficient fails at import, not in a user's run.

:meth:`ButcherTableau.to` returns a :class:`TableauTensors` on one device/dtype, built once per
solve, so the step loop never converts constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

__all__ = ["ButcherTableau", "TableauTensors", "rooted_tree_conditions"]


@lru_cache(maxsize=None)
def _trees(max_order: int) -> tuple[list[tuple[int, ...]], list[int], list[float]]:
    """All rooted trees up to ``max_order``: children (indices of earlier trees), order, γ."""
    children: list[tuple[int, ...]] = [()]
    order: list[int] = [1]
    gamma: list[float] = [1.0]
    by_order: dict[int, list[int]] = {1: [0]}

    def multisets(total: int, max_idx: int):
        # non-increasing sequences of tree indices whose orders sum to ``total``
        if total == 0:
            yield ()
            return
        for idx in range(max_idx, -1, -1):
            o = order[idx]
            if o <= total:
                for rest in multisets(total - o, idx):
                    yield (idx,) + rest

    for n in range(2, max_order + 1):
        by_order[n] = []
        last = len(children) - 1
        for ch in multisets(n - 1, last):
            children.append(ch)
            order.append(n)
            gamma.append(n * float(np.prod([gamma[c] for c in ch])))
            by_order[n].append(len(children) - 1)
    return children, order, gamma


def rooted_tree_conditions(a: np.ndarray, max_order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elementary weights Φ (n_trees, s), tree orders ρ (n_trees,) and γ (n_trees,).

    Weights ``w`` give order ``p`` iff ``Φ[ρ<=p] @ w == θ**ρ / γ`` (θ = 1 for the step itself).
    """
    children, order, gamma = _trees(max_order)
    s = a.shape[0]
    phi = np.empty((len(children), s))
    for i, ch in enumerate(children):
        v = np.ones(s)
        for c in ch:
            v = v * (a @ phi[c])
        phi[i] = v
    return phi, np.array(order), np.array(gamma)


_TENSOR_CACHE: dict = {}


@dataclass(frozen=True)
class TableauTensors:
    """A tableau's constants on one device/dtype (built once per solve by ``ButcherTableau.to``).

    ``a_rows[i]`` is the (i,) weight vector of stage i; ``b``/``b_err``/``b_err3`` are (s,);
    ``extra_rows[j]`` weights all previous stages of the j-th dense-output stage.
    """

    a_rows: list[torch.Tensor | None]
    b: torch.Tensor
    b_err: torch.Tensor | None
    b_err3: torch.Tensor | None
    extra_rows: list[torch.Tensor]


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method as validated data.

    Attributes:
        name: method name used by ``odeint(method=...)``.
        c: (s,) stage times as fractions of the step.
        a: lower-triangular rows; ``a[i]`` has ``i`` entries (``a[0] == ()``).
        b: (s,) weights of the propagated solution.
        order: classical order of ``b``.
        b_err: (s,) error weights ``b - b̂`` of the embedded method, or None for fixed-step methods.
        error_order: order of the embedded solution ``b̂`` (the step-size exponent is 1/(error_order+1)).
        b_err3: DOP853 only: the second (3rd-order) error weights combined as in Hairer's dop853.f.
        extra_c / extra_a: stages evaluated only for dense output (DOP853), each row over all
            previous stages (s + j entries).
        dense: coefficient matrix (s + n_extra, deg): ``b_j(θ) = Σ_k dense[j][k] θ^(k+1)``.
        dense_order: order of the continuous extension (checked by order conditions).
        reference: the publication the coefficients come from.
    """

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    reference: str
    b_err: tuple[float, ...] | None = None
    error_order: int | None = None
    b_err3: tuple[float, ...] | None = None
    extra_c: tuple[float, ...] = ()
    extra_a: tuple[tuple[float, ...], ...] = ()
    dense: tuple[tuple[float, ...], ...] | None = None
    dense_order: int | None = None
    check_tol: float = 1e-12
    fsal: bool = field(init=False)
    stages: int = field(init=False)

    @property
    def adaptive(self) -> bool:
        """Whether the method has an error estimate (error weights): step-size control and
        per-sample stepping need one; a tableau without is a fixed-grid method."""
        return self.b_err is not None

    @property
    def control_order(self) -> int | None:
        """q such that the step-size exponent is 1/(q+1): the order the error estimate scales with, less one.

        The embedded order for ordinary pairs; DOP853's combined estimate err5²/sqrt(err5² + 0.01·err3²)
        scales like h⁸, so Hairer's dop853.f uses the exponent 1/8 there (q = 7).
        """
        if self.b_err3 is not None:
            return self.order - 1
        return self.error_order

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"{self.name}: a must have s={s} rows with row i of length i")
        if len(self.b) != s:
            raise ValueError(f"{self.name}: b must have {s} entries")
        tol = self.check_tol
        for i, row in enumerate(self.a):
            if abs(sum(row) - self.c[i]) > tol:
                raise ValueError(f"{self.name}: row {i} of a sums to {sum(row)}, not c={self.c[i]}")
        A = self.full_a(extended=False)
        phi, rho, gamma = rooted_tree_conditions(A, max(self.order, self.error_order or 1))
        self._check_order(phi, rho, gamma, np.array(self.b), self.order, "b")
        if self.b_err is not None:
            if len(self.b_err) != s or self.error_order is None:
                raise ValueError(f"{self.name}: b_err needs {s} entries and an error_order")
            bhat = np.array(self.b) - np.array(self.b_err)
            self._check_order(phi, rho, gamma, bhat, self.error_order, "embedded b̂")
        if self.b_err3 is not None:
            bhat3 = np.array(self.b) - np.array(self.b_err3)
            self._check_order(phi, rho, gamma, bhat3, 3, "3rd-order embedded b̂3")
        if self.dense is not None:
            Ae = self.full_a(extended=True)
            phie, rhoe, gammae = rooted_tree_conditions(Ae, self.dense_order)
            P = np.array(self.dense)
            if P.shape[0] != Ae.shape[0]:
                raise ValueError(f"{self.name}: dense needs one row per stage (incl. extra stages)")
            for theta in (0.1, 0.37, 0.5, 0.81, 1.0):
                w = P @ theta ** np.arange(1, P.shape[1] + 1)
                mask = rhoe <= self.dense_order
                resid = phie[mask] @ w - theta ** rhoe[mask] / gammae[mask]
                if np.max(np.abs(resid)) > 1e3 * tol:
                    raise ValueError(
                        f"{self.name}: dense output fails order {self.dense_order} at θ={theta}"
                        f" (residual {np.max(np.abs(resid)):.2e})"
                    )
        fsal = (
            s > 1
            and self.c[-1] == 1.0
            and self.b[-1] == 0.0
            and all(abs(x - y) <= tol for x, y in zip(self.a[-1], self.b[:-1]))
        )
        object.__setattr__(self, "fsal", fsal)
        object.__setattr__(self, "stages", s)

    def _check_order(self, phi, rho, gamma, w, p, what) -> None:
        mask = rho <= p
        resid = phi[mask] @ w - 1.0 / gamma[mask]
        bad = np.abs(resid) > self.check_tol * 100
        if bad.any():
            o = int(rho[mask][bad].min())
            raise ValueError(f"{self.name}: {what} violates an order-{o} condition (claimed order {p})")
        # must not claim too low an order silently is fine; a typo lowers the order, caught above

    def full_a(self, *, extended: bool) -> np.ndarray:
        """The (s, s) matrix A, or (s+e, s+e) with the dense-output stages when ``extended``."""
        rows = list(self.a) + (list(self.extra_a) if extended else [])
        n = len(rows)
        A = np.zeros((n, n))
        for i, row in enumerate(rows):
            A[i, : len(row)] = row
        return A

    def to(self, device: torch.device | str | None, dtype: torch.dtype) -> TableauTensors:
        """The tableau's weights as tensors on ``device`` with ``dtype`` (made once per
        device/dtype and cached: read-only constants, so solves can share them)."""
        key = (self.name, str(torch.device(device) if device is not None else "cpu"), dtype)
        hit = _TENSOR_CACHE.get(key)
        if hit is not None and hit[0] is self:
            return hit[1]
        tt = self._to(device, dtype)
        _TENSOR_CACHE[key] = (self, tt)
        return tt

    def _to(self, device, dtype) -> TableauTensors:
        def t(x):
            return torch.tensor(x, dtype=dtype, device=device)

        return TableauTensors(
            a_rows=[None] + [t(row) for row in self.a[1:]],
            b=t(self.b),
            b_err=None if self.b_err is None else t(self.b_err),
            b_err3=None if self.b_err3 is None else t(self.b_err3),
            extra_rows=[t(row) for row in self.extra_a],
        )


class VPoly:
    """Polynomial in θ with vector (per-stage) coefficients, to turn a published dense-output
    formula in nested form into the plain coefficient matrix that Horner's rule evaluates."""

    def __init__(self, coef: np.ndarray):
        self.coef = np.atleast_2d(np.asarray(coef, dtype=float))  # (deg+1, n_stages)

    @staticmethod
    def const(v) -> "VPoly":
        return VPoly(np.asarray(v, dtype=float)[None, :])

    def __add__(self, other: "VPoly") -> "VPoly":
        n = max(len(self.coef), len(other.coef))
        out = np.zeros((n, self.coef.shape[1]))
        out[: len(self.coef)] += self.coef
        out[: len(other.coef)] += other.coef
        return VPoly(out)

    def times(self, scalar_poly) -> "VPoly":
        """Multiply by a scalar polynomial given as coefficients (low → high) in θ."""
        p = np.asarray(scalar_poly, dtype=float)
        out = np.zeros((len(self.coef) + len(p) - 1, self.coef.shape[1]))
        for i, ci in enumerate(p):
            out[i : i + len(self.coef)] += ci * self.coef
        return VPoly(out)

    def as_dense(self) -> tuple[tuple[float, ...], ...]:
        """(n_stages, deg) coefficients of θ^1..θ^deg (the θ^0 term must vanish)."""
        if np.max(np.abs(self.coef[0])) > 1e-14:
            raise ValueError("dense output must vanish at θ=0")
        return tuple(tuple(float(x) for x in row) for row in self.coef[1:].T)


THETA = [0.0, 1.0]
ONE_MINUS_THETA = [1.0, -1.0]


def hermite_dense(b: tuple[float, ...], n_stages: int) -> tuple[tuple[float, ...], ...]:
    """Cubic Hermite dense output through y0, y1, f(y0)=k_1, f(y1)=k_s for FSAL methods.

    y(θ) = y0 + h[(θ - 2θ² + θ³) k_1 + (3θ² - 2θ³) Σ b_j k_j + (θ³ - θ²) k_s]  (order 3).
    """
    B = np.array(b, dtype=float)
    e1 = np.zeros(n_stages)
    e1[0] = 1.0
    es = np.zeros(n_stages)
    es[-1] = 1.0
    coef = np.zeros((4, n_stages))
    coef[1] = e1
    coef[2] = -2 * e1 + 3 * B - es
    coef[3] = e1 - 2 * B + es
    return VPoly(coef).as_dense()


def hairer_dense(b, d_rows, n_stages, n_total) -> tuple[tuple[float, ...], ...]:
    """Hairer's nested continuous extension (dopri5.f CONTD5 / dop853.f CONTD8).

    y(θ) = y0 + r2 θ + r3 θ(1-θ) + r4 θ²(1-θ) + θ²(1-θ)² (r5 + θ r6 + θ(1-θ) r7 + θ²(1-θ) r8)
    with r2 = Σ b k, r3 = k_1 - r2, r4 = r2 - k_s - r3 and r5.. = Σ d k (all times h).
    """
    B = np.zeros(n_total)
    B[: len(b)] = b
    e1 = np.zeros(n_total)
    e1[0] = 1.0
    es = np.zeros(n_total)
    es[n_stages - 1] = 1.0
    r2 = VPoly.const(B)
    r3 = VPoly.const(e1 - B)
    r4 = VPoly.const(2 * B - e1 - es)
    d = [VPoly.const(np.pad(np.asarray(row, float), (0, n_total - len(row)))) for row in d_rows]
    # conpar = r5 + θ(r6 + (1-θ)(r7 + θ r8))
    con = None
    if d:
        inner = d[0]
        if len(d) == 4:
            inner = d[0] + (d[1] + (d[2] + d[3].times(THETA)).times(ONE_MINUS_THETA)).times(THETA)
        con = inner
    # y = θ(r2 + (1-θ)(r3 + θ(r4 + (1-θ) con)))
    t4 = r4 if con is None else r4 + con.times(ONE_MINUS_THETA)
    poly = (r2 + (r3 + t4.times(THETA)).times(ONE_MINUS_THETA)).times(THETA)
    return poly.as_dense()
